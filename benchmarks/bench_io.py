"""I/O benchmark: load a 300x512x512 CT series written with shuffled file names.

Compares ``napari_tghmoe.io.load_volume`` with SimpleITK's ``ImageSeriesReader`` (GDCM,
C++; including ``GetGDCMSeriesFileNames``, which finds and sorts the files) and a naive
pydicom loop (read every file, sort by position, stack). Each loader runs in its own
fresh Python process so neither the page cache warm-up order nor a previous loader's
memory skews the others:

* time: ``--rounds`` rounds; in each round every loader runs in a fresh process (one
  warm-up load, then ``--repeats`` timed loads), loaders interleaved so that load from
  other processes on a shared machine drifts over all of them alike; the table gives the
  median and the best of all timed loads;
* peak memory: a separate fresh process does one load and reports its own peak RSS
  (``VmHWM`` from ``/proc/self/status``, which sees C allocations too; ``ru_maxrss`` is not
  used because Linux carries the parent's high-water mark across fork+exec); a baseline
  process that only imports the same libraries is subtracted.

Run: ``.venv/bin/python benchmarks/bench_io.py [--slices 300] [--rounds 5] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPORTS = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import sys, time, json
import numpy as np
import pydicom, SimpleITK as sitk
import napari_tghmoe.io as tio
"""

LOADERS = {
    "load_volume": """
def load(folder):
    return tio.load_volume(folder).hu
""",
    "SimpleITK ImageSeriesReader": """
def load(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    return sitk.GetArrayFromImage(reader.Execute())
""",
    "naive pydicom loop": """
import os
def load(folder):
    datasets = [pydicom.dcmread(os.path.join(root, name))
                for root, _, names in os.walk(folder) for name in names]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + np.int16(ds.RescaleIntercept)
                     for ds in datasets])
""",
}

TIMING = """
folder, repeats = sys.argv[1], int(sys.argv[2])
load(folder)  # warm-up (page cache, lazy imports)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    hu = load(folder)
    times.append(time.perf_counter() - start)
    del hu
print(json.dumps({"times": times}))
"""

MEMORY = """
folder = sys.argv[1]
hu = load(folder)
print(json.dumps({"peak_kib": peak_kib(),
                  "shape": list(hu.shape), "checksum": int(hu[::7, ::7, ::7].astype(np.int64).sum())}))
"""

BASELINE = """
print(json.dumps({"peak_kib": peak_kib()}))
"""


def run_child(code: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_series(folder: str, slices: int) -> float:
    from napari_tghmoe.io import CTVolume, write_dicom_series

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :512, :512]
    body = ((y - 256) ** 2 / 200**2 + (x - 256) ** 2 / 240**2) < 1
    hu = np.where(body, 40, -1000).astype(np.int16) + (rng.standard_normal((slices, 512, 512), dtype=np.float32) * 20).astype(np.int16)
    hu[:, 240:270, 240:270] += (z * 3).astype(np.int16)  # varies along z: a wrong order shows
    start = time.perf_counter()
    write_dicom_series(CTVolume(hu=hu, spacing=(1.0, 0.7, 0.7)), folder, shuffle_names=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", help="reuse an existing series folder instead of writing one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        folder = args.folder or os.path.join(tmp, "series")
        if not args.folder:
            seconds = write_series(folder, args.slices)
            print(f"wrote {args.slices} x 512 x 512 int16 series (shuffled names) in {seconds:.1f} s")
        volume_mib = args.slices * 512 * 512 * 2 / 2**20
        baseline = run_child(IMPORTS + BASELINE)["peak_kib"]
        times: dict[str, list[float]] = {name: [] for name in LOADERS}
        for _ in range(args.rounds):
            for name, loader in LOADERS.items():
                times[name] += run_child(IMPORTS + loader + TIMING, folder, str(args.repeats))["times"]
        rows = {}
        checks = set()
        for name, loader in LOADERS.items():
            memory = run_child(IMPORTS + loader + MEMORY, folder)
            checks.add((tuple(memory["shape"]), memory["checksum"]))
            rows[name] = (float(np.median(times[name])), min(times[name]), (memory["peak_kib"] - baseline) / 1024)
        if len(checks) != 1:
            print(f"WARNING: loaders disagree on the volume: {checks}")
        ref_time, ref_best, ref_mem = rows["SimpleITK ImageSeriesReader"]
        runs = args.rounds * args.repeats
        print(f"\nvolume: {args.slices}x512x512 int16 = {volume_mib:.0f} MiB; {runs} timed loads per loader"
              f" ({args.rounds} interleaved rounds); baseline process (imports only) peak RSS {baseline / 1024:.0f} MiB")
        print("| loader | median time (s) | median vs SimpleITK | best time (s) | best vs SimpleITK |"
              " peak extra RSS (MiB) | memory vs volume | memory vs SimpleITK |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, (seconds, best, mib) in rows.items():
            print(f"| {name} | {seconds:.3f} | {seconds / ref_time:.2f}x | {best:.3f} | {best / ref_best:.2f}x |"
                  f" {mib:.0f} | {mib / volume_mib:.2f}x | {mib / ref_mem:.2f}x |")
        print(f"\nsame array from every loader: {len(checks) == 1}")


if __name__ == "__main__":
    main()
