"""Segmentation benchmark: ``segment_volume`` on a 300x512x512 CT against plain MONAI.

The CT is a phantom rendered at 300x512x512 (1.0 x 0.7 x 0.7 mm, so its extent is a real
abdomen scan's). Two paths segment it with the same network(s) (the bundled demo segmentation
model unless ``--model``):

* ``segment_volume``: this project's path (box-average + trilinear resample to the working
  spacing, Gaussian-weighted ``sliding_window_inference``, labels back to the scan's grid by
  nearest-neighbour index lookup, connected findings, finding presence);
* ``MONAI baseline``: what a plain MONAI script does: ``Spacing`` (trilinear) to the working
  spacing, ``ScaleIntensityRange`` per window, ``sliding_window_inference`` (same window,
  overlap, batch), ``argmax``, ``Resize`` (nearest) of the labels back to the scan's shape.
  It yields the label map only (no findings, no presence). A model with ``position_channels``
  gets the same three position channels (``napari_tghmoe.med3d.data.position_channels``).

A cascade folder (its config names a ``finding_model`` sub-folder) runs both networks in both
paths. The baseline then does, with plain MONAI as above: the organ model on its grid, organ
labels = ``argmax`` over the background and organ channels only (as ``organ_only_labels``);
the finding model on its own working spacing (``Spacing`` of the CT again, its own windows)
with the organ-context channels (``napari_tghmoe.med3d.data.organ_context_channels``: the
organ labels by nearest neighbour on the finder's grid, one channel per ``context_groups``
entry), ``sliding_window_inference`` with the finder's window / overlap / batch, ``argmax``;
finding labels (as the organ model's label values) drawn over the organ labels on the finder's
grid (organ labels ``Resize`` nearest onto it), and that map ``Resize`` (nearest) back to the
scan's shape. The finding verifier (``finding_verifier``, a second look at each proposed
finding component, eight flips of one crop each) is not part of the baseline: it is extra
work ``segment_volume`` does, and its cost is inside ``segment_volume``'s time. Nor are the
finder's ``min_finding_probability`` and ``finding_sites``: the baseline's map keeps every
finding voxel the finder labels, where ``segment_volume`` gives rejected components back to
the organs.

Each path runs in its own fresh process (rounds interleaved, like ``bench_io.py``): time is
the median and best of the timed runs after one warm-up; peak memory is the process's
``VmHWM`` minus that of a process that only imports the same libraries and loads the CT.
On a GPU machine (``--device cuda``) both paths put the networks (and the verifier) on the GPU.

Run: ``.venv/bin/python benchmarks/bench_seg.py [--rounds 3] [--threads 2] [--model DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

PRELUDE = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import json, sys, time
import numpy as np
import torch
torch.set_num_threads({threads})
import monai
from monai.inferers import sliding_window_inference
from napari_tghmoe.io import CTVolume
from napari_tghmoe.med3d.segment import segment_volume
from napari_tghmoe.med3d.encoder import load_seg_model
hu = np.load({ct!r})
volume = CTVolume(hu=hu, spacing=(1.0, 0.7, 0.7), origin=(-179.0, -179.0, -300.0))
model_dir = {model!r}
device = {device!r}
"""

PATHS = {
    "segment_volume": """
import napari_tghmoe.med3d.segment as seg
folder = seg._resolve_model_dir(model_dir)
model = seg._model(folder).to(device)
finder = seg.finding_model_of(folder, model.config)  # a cascade's finding model, cached beside it
if finder is not None:
    finder.to(device)
    verifier = seg.verifier_of(folder / model.config.finding_model, finder.config)  # cached too
    if verifier is not None:
        verifier.to(device)
def run():
    result = segment_volume(volume, model_dir)
    return result.labels
""",
    "MONAI baseline": """
import os
from monai.data import MetaTensor
from monai.transforms import Resize, ScaleIntensityRange, Spacing
model = load_seg_model(model_dir).to(device)
config = model.config
finder = None  # a cascade's finding model
if config.finding_model:
    finder = load_seg_model(os.path.join(model_dir, config.finding_model)).to(device)

def predict(net, image, label_count=None, organ_labels=None):
    # Spacing to the net's grid, its windows (+ extra channels), sliding windows, argmax
    net_config = net.config
    resampled = Spacing(pixdim=tuple(net_config.working_spacing), mode="bilinear")(image)
    channels = torch.cat([
        ScaleIntensityRange(a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True)(resampled)
        for c, w in net_config.ct_windows
    ])
    if net_config.position_channels:  # the network's extra input: position in the body's box
        from napari_tghmoe.med3d.data import position_channels
        channels = torch.cat([channels, torch.from_numpy(position_channels(resampled[0].numpy()))])
    if net_config.context_groups:  # a finding model's extra input: the organ model's labels
        from napari_tghmoe.med3d.data import organ_context_channels
        context = organ_context_channels(
            organ_labels, config.label_names, net_config.context_groups, channels.shape[1:]
        )
        channels = torch.cat([channels, torch.from_numpy(context.astype(np.float32))])
    with torch.inference_mode():
        logits = sliding_window_inference(
            channels[None].float().to(device), tuple(net_config.patch_size), net_config.sw_batch_size,
            lambda x: net(x)[0], overlap=net_config.sw_overlap, mode="gaussian",
        )
    logits = logits[0, :label_count]  # a cascade's organ pass: background and organs only
    labels = logits.argmax(0, keepdim=True).cpu()
    return labels.as_tensor() if hasattr(labels, "as_tensor") else labels

def run():
    affine = torch.diag(torch.tensor([*volume.spacing, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(volume.hu.astype(np.float32))[None], affine=affine)
    if finder is None:
        labels = predict(model, image)
    else:
        organs = predict(model, image, 1 + len(config.organ_names))
        found = predict(finder, image, organ_labels=organs[0].numpy().astype(np.uint8))
        lut = torch.zeros(finder.config.num_labels_total, dtype=torch.long)
        for kind in finder.config.finding_kinds:  # finder label values -> the organ model's
            lut[finder.config.finding_label(kind)] = config.finding_label(kind)
        found = lut[found]
        organs = Resize(spatial_size=found.shape[1:], mode="nearest")(organs.float()).long()
        labels = torch.where(found > 0, found, organs)
    back = Resize(spatial_size=volume.shape, mode="nearest")(labels.float())
    return np.asarray(back[0]).astype(np.uint8)
""",
}

TIMED = """
run()  # warm-up
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    labels = run()
    times.append(time.perf_counter() - start)
print(json.dumps({{"times": times, "shape": list(labels.shape)}}))
"""

PEAK = """
labels = run()
print(json.dumps({"peak_kib": peak_kib(), "shape": list(labels.shape)}))
"""

BASELINE = """
print(json.dumps({"peak_kib": peak_kib()}))
"""


def _run(code: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="segmentation model folder (default: the bundled demo)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="300x512x512")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    from napari_tghmoe._resources import resources_dir
    from napari_tghmoe.phantom import make_phantom

    model = args.model or str(resources_dir() / "demo-seg-model")
    shape = tuple(int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        ct_path = os.path.join(tmp, "ct.npy")
        phantom = make_phantom(11, "abdomen", shape=shape, spacing=(1.0, 0.7, 0.7))
        np.save(ct_path, phantom.volume.hu)
        del phantom
        prelude = PRELUDE.format(threads=args.threads, ct=ct_path, model=model, device=args.device)
        baseline_kib = _run(prelude + BASELINE)["peak_kib"]
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for round_index in range(1, args.rounds + 1):
            for name, code in PATHS.items():
                measured = _run(prelude + code + TIMED.format(repeats=args.repeats))["times"]
                times[name] += measured
                # each round as it ends (stderr, flushed): a run cut off by a time limit still says what it measured
                print(f"round {round_index}/{args.rounds}: {name}: " + ", ".join(f"{t:.2f} s" for t in measured),
                      file=sys.stderr, flush=True)
        peaks = {name: _run(prelude + code + PEAK)["peak_kib"] - baseline_kib for name, code in PATHS.items()}
    rows = []
    reference = "MONAI baseline"
    for name in PATHS:
        median = float(np.median(times[name]))
        rows.append(
            {
                "path": name,
                "median_s": round(median, 2),
                "best_s": round(min(times[name]), 2),
                "peak_mib": round(peaks[name] / 1024, 1),
                "time_ratio": round(median / float(np.median(times[reference])), 2),
                "memory_ratio": round(peaks[name] / max(1, peaks[reference]), 2),
            }
        )
    with open(os.path.join(model, "config.json")) as handle:
        finding_model = json.load(handle).get("finding_model") or ""
    kind = f"cascade: organ model + finding model {finding_model!r}" if finding_model else "single model"
    print(f"CT {shape} at (1.0, 0.7, 0.7) mm, model {model} ({kind}), {args.threads} thread(s), "
          f"device {args.device}, {args.rounds} round(s) x {args.repeats}")
    print("| path | median s | best s | peak MiB above imports | time / baseline | memory / baseline |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['median_s']} | {row['best_s']} | {row['peak_mib']} | {row['time_ratio']} | {row['memory_ratio']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": shape, "threads": args.threads, "device": args.device, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
