"""Med3DInsight: PSAT, the partial-OT loss, pretrain -> finetune-seg -> segment on a tiny recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_tghmoe.io import CTVolume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "med3d-tiny.toml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- PSAT


def _psat():
    from napari_tghmoe.med3d.psat import PlaneSliceAwareTransformer

    torch.manual_seed(0)
    return PlaneSliceAwareTransformer(
        token_channels=12, token_grid=(2, 2, 2), hidden=16, queries=5, layers=2, heads=2, ffn=32, slice_bins=8, out_dim=7
    ).eval()


def test_psat_output_shape_and_plane_slice_awareness():
    psat = _psat()
    tokens = torch.randn(1, 8, 12).expand(3, -1, -1)
    planes = torch.tensor([0, 1, 0])
    fractions = torch.tensor([0.1, 0.1, 0.9])
    with torch.no_grad():
        out = psat(tokens, planes, fractions)
    assert out.shape == (3, 7)
    # same tokens: another plane, or another slice of the same plane, gives another embedding
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert not torch.allclose(out[0], out[2], atol=1e-4)
    with torch.no_grad():
        again = psat(tokens[:1], planes[:1], torch.tensor([0.11]))  # same slice bin as 0.1
    assert torch.allclose(again[0], out[0], atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        psat(torch.randn(1, 9, 12), planes[:1], fractions[:1])


# --------------------------------------------------------------------------- losses


def test_partial_ot_loss_matches_hand_worked_case():
    from napari_tghmoe.med3d.losses import mahalanobis_cost, partial_ot_loss, partial_ot_plan

    x = torch.eye(2)  # cost with L = I: [[0, sqrt 2], [sqrt 2, 0]] / sqrt 2 = [[0, 1], [1, 0]]
    cost = mahalanobis_cost(x, x, torch.eye(2))
    assert torch.allclose(cost, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), atol=1e-5)
    plan = partial_ot_plan(cost, reg=0.03, mass=0.95)
    # exp(-1 / 0.03) ~ 3e-15: all of the 0.95 mass stays on the diagonal, half each
    assert torch.allclose(plan, torch.tensor([[0.475, 0.0], [0.0, 0.475]]), atol=1e-4)
    loss = partial_ot_loss(x, x, torch.eye(2), reg=0.03, mass=0.95)
    assert float(loss) == pytest.approx(-math.log(0.95 / 2), abs=1e-3)


def test_partial_ot_loss_lower_for_aligned_pairs_and_decreases_when_optimised():
    from napari_tghmoe.med3d.losses import partial_ot_loss

    torch.manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    factor = torch.eye(5)
    aligned = float(partial_ot_loss(target, target, factor))
    shuffled = float(partial_ot_loss(target[torch.tensor([1, 2, 3, 4, 5, 0])], target, factor))
    assert aligned < shuffled
    source = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1).requires_grad_(True)
    optimiser = torch.optim.Adam([source], lr=0.05)
    first = None
    for _ in range(20):
        loss = partial_ot_loss(torch.nn.functional.normalize(source, dim=-1), target, factor)
        first = float(loss.detach()) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss.detach()) < first - 0.5


def test_mahalanobis_factor_gets_gradient_through_the_plan():
    from napari_tghmoe.med3d.losses import partial_ot_loss

    torch.manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(5, 4), dim=-1)
    factor = torch.eye(4, requires_grad=True)
    loss = partial_ot_loss(x, y, factor)
    loss.backward()
    assert factor.grad is not None and float(factor.grad.abs().sum()) > 0
    with torch.no_grad():
        moved = partial_ot_loss(x, y, factor - 10.0 * factor.grad)
    assert float(moved) < float(loss)


def test_alignment_loss_switch_infonce():
    from napari_tghmoe.med3d.losses import alignment_loss, info_nce_loss

    torch.manual_seed(2)
    image = torch.randn(4, 6)
    text = torch.randn(4, 6)
    factor = torch.eye(6)
    matched = alignment_loss(image, image, text, factor, align="infonce")
    unmatched = alignment_loss(image.flip(0), image, text, factor, align="infonce")
    assert float(matched["image"]) < float(unmatched["image"])
    normalised = torch.nn.functional.normalize(image, dim=-1)
    assert float(matched["image"]) == pytest.approx(float(info_nce_loss(normalised, normalised, 0.07)), abs=1e-5)
    ot = alignment_loss(image, image, text, factor, align="ot")
    assert float(ot["image"]) != pytest.approx(float(matched["image"]), abs=1e-3)
    with pytest.raises(ValueError, match="align"):
        alignment_loss(image, image, text, factor, align="mmd")


# --------------------------------------------------------------------------- models


def test_seg_model_save_load_round_trip(tmp_path):
    from napari_tghmoe.med3d.encoder import Med3DConfig, build_tiny_seg_model, load_seg_model

    folder = build_tiny_seg_model(tmp_path / "seg", seed=3)
    assert (folder / "model.safetensors").is_file()
    config = Med3DConfig.from_pretrained(str(folder))
    assert config.label_names[0] == "background" and "renal cyst" in config.label_names
    model = load_seg_model(folder)
    x = torch.rand(1, config.in_channels, *config.patch_size)
    with torch.no_grad():
        first = model(x)
        second = load_seg_model(folder)(x)
    assert first[0].shape == (1, len(config.label_names), *config.patch_size)
    assert first[1].shape == (1, len(config.finding_kinds))
    assert torch.allclose(first[0], second[0]) and torch.allclose(first[1], second[1])


def test_config_rejects_bad_values():
    from napari_tghmoe.med3d.encoder import Med3DConfig

    with pytest.raises(ValueError, match="patch_size"):
        Med3DConfig(patch_size=[18, 16, 16], blocks_down=[1, 1, 1])
    with pytest.raises(ValueError, match="encoder"):
        Med3DConfig(encoder="nnformer")
    with pytest.raises(ValueError, match="kinds this model does not label: gallstone"):
        Med3DConfig(finding_sites={"gallstone": ["liver"]})
    with pytest.raises(ValueError, match="organs this model does not label: pancreas"):
        Med3DConfig(finding_sites={"renal cyst": ["pancreas"]})
    assert Med3DConfig(organ_names=[], finding_sites={"renal cyst": ["pancreas"]}).finding_sites  # its cascade checks


def test_axial_view_undoes_a_coronal_storage():
    from napari_tghmoe.med3d.segment import _from_axial, _to_axial, axial_view

    axial = np.arange(24).reshape(2, 3, 4)
    # a coronal series: array axes (k, j, i) run along (P, S reversed, L)
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    order, flips = axial_view(direction)
    stored = np.flip(np.transpose(axial, (1, 0, 2)), axis=1)  # what such a series would hold
    assert order == (1, 0, 2) and flips == (True, False, False)
    assert np.array_equal(_to_axial(stored, order, flips), axial)
    assert np.array_equal(_from_axial(axial, order, flips), stored)


# --------------------------------------------------------------------------- end to end


def _run(argv, capsys=None):
    from napari_tghmoe.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pretrain (2 of 3 steps, then resumed) and finetune-seg from it, on the tiny recipe."""
    from napari_tghmoe.med3d.pretrain import pretrain
    from napari_tghmoe.med3d.recipe import load_recipe

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("med3d")
    recipe = load_recipe(TINY_RECIPE)
    stopped = pretrain(recipe, root / "pre", progress=False, stop_after=2)
    assert not stopped.finished and stopped.steps_done == 2
    assert not (root / "pre" / "model.safetensors").exists()
    code = _run(["pretrain", "--config", str(TINY_RECIPE), "--out", str(root / "pre"), "--resume", "--no-progress"])
    assert code == 0
    code = _run(
        ["finetune-seg", "--config", str(TINY_RECIPE), "--out", str(root / "seg"), "--init", str(root / "pre"),
         "--label-fraction", "0.5", "--no-progress"]
    )
    assert code == 0
    return root


def test_pretrain_resumes_and_logs(trained):
    log = [json.loads(line) for line in (trained / "pre" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert all(math.isfinite(entry["align_image"]) and math.isfinite(entry["align_text"]) for entry in log)
    summary = json.loads((trained / "pre" / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == 2
    assert (trained / "pre" / "targets.safetensors").is_file()
    from napari_tghmoe.med3d.encoder import load_pretrain_model

    model = load_pretrain_model(trained / "pre")
    assert model.config.target_dim == 128 and model.mahalanobis_factor.shape == (128, 128)


def test_finetune_starts_from_the_pretrained_encoder(trained):
    from napari_tghmoe.med3d.encoder import is_encoder_key, load_pretrain_model, load_seg_model
    from napari_tghmoe.med3d.finetune import labelled_subset

    summary = json.loads((trained / "seg" / "training_summary.json").read_text())
    assert summary["encoder_tensors_from_init"] > 0
    assert summary["label_fraction"] == 0.5 and len(summary["labelled_volumes"]) == 1
    assert labelled_subset(40, 0.1, 0) == labelled_subset(40, 0.1, 0) and len(labelled_subset(40, 0.1, 0)) == 4
    pre = load_pretrain_model(trained / "pre").backbone.state_dict()
    seg = load_seg_model(trained / "seg").backbone.state_dict()
    encoder_keys = [k for k in pre if is_encoder_key("segresnet", k) and k.endswith("weight")]
    assert encoder_keys
    # fine-tuning moved the encoder a little from where pre-training left it, not from scratch
    diffs = [float((pre[k] - seg[k]).abs().max()) for k in encoder_keys]
    assert max(diffs) < 0.05


def test_a_continued_model_keeps_its_weights_start_but_takes_the_recipes_finding_rules(trained, tmp_path):
    from napari_tghmoe.med3d.encoder import load_seg_model

    sites = "model.finding_sites={'renal cyst' = ['right kidney', 'left kidney']}"
    code = _run(
        ["finetune-seg", "--config", str(TINY_RECIPE), "--out", str(tmp_path / "more"), "--init", str(trained / "seg"),
         "--set", sites, "--set", "model.min_finding_probability=0.4", "--set", "model.feature_size=16",
         "--set", "finetune.steps=1", "--no-progress"]
    )
    assert code == 0
    before, after = load_seg_model(trained / "seg"), load_seg_model(tmp_path / "more")
    assert after.config.finding_sites == {"renal cyst": ["right kidney", "left kidney"]}
    assert after.config.min_finding_probability == 0.4
    assert after.config.feature_size == before.config.feature_size  # the architecture stays the model's own
    assert before.config.finding_sites == {}


def _nifti_scan(tmp_path: Path) -> tuple[Path, object]:
    from napari_tghmoe.io._write import write_volume
    from napari_tghmoe.phantom import make_phantom

    phantom = make_phantom(5, "abdomen", spacing=(7.0, 6.0, 6.0))
    volume = phantom.volume
    volume.origin = (-120.5, 33.25, 410.0)
    path = write_volume(volume, tmp_path / "scan.nii.gz")
    return path, volume


def test_segment_cli_writes_labels_on_the_scans_own_grid(trained, tmp_path, capsys):
    import SimpleITK as sitk

    scan, volume = _nifti_scan(tmp_path)
    out = tmp_path / "seg.nii.gz"
    code = _run(["segment", str(scan), "--out", str(out), "--model", str(trained / "seg")])
    assert code == 0
    written = sitk.ReadImage(str(out))
    source = sitk.ReadImage(str(scan))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing())
    assert np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetDirection(), source.GetDirection())
    names = json.loads((tmp_path / "seg.labels.json").read_text())
    assert names["0"] == "background" and "liver" in names.values() and "renal cyst" in names.values()
    values = np.unique(sitk.GetArrayFromImage(written))
    assert set(values.tolist()) <= {int(k) for k in names}
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["finding_presence"]) >= {"renal cyst", "lung nodule"}


def test_segment_volume_progress_stop_and_findings(trained):
    from napari_tghmoe.med3d import SegmentationStopped, segment_volume
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(7, "chest", spacing=(8.0, 8.0, 8.0)).volume
    calls = []
    result = segment_volume(volume, trained / "seg", progress=lambda done, total: calls.append((done, total)))
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    assert calls and calls[-1][0] == calls[-1][1] and all(total == calls[0][1] for _, total in calls)
    assert result.label_names[0] == "background"
    for finding in result.findings:
        assert result.labels[finding.voxel_zyx] == finding.label
        assert np.allclose(finding.position_mm, volume.index_to_patient(finding.voxel_zyx), atol=0.01)
    assert all(0.0 <= p <= 1.0 for p in result.finding_presence.values())
    with pytest.raises(SegmentationStopped):
        segment_volume(volume, trained / "seg", should_stop=lambda: True)


def test_eval_seg_reports_the_numbers(trained, tmp_path):
    out = tmp_path / "results.json"
    code = _run(["eval-seg", "--model", str(trained / "seg"), "--data", "phantom:seeds=900000-900001,region=both,spacing=8x8x8", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["volumes"] == 2
    assert 0.0 <= results["mean_dice"] <= 1.0
    assert "liver" in results["dice_per_organ"] or "right upper lobe" in results["dice_per_organ"]
    assert results["false_findings_per_volume"] >= 0


def test_segment_bad_inputs_give_one_line_errors(trained, tmp_path, capsys):
    import pydicom
    import SimpleITK as sitk

    from napari_tghmoe.phantom import make_phantom, write_dicom_series

    # an MR series
    volume = make_phantom(1, "chest", spacing=(10.0, 10.0, 10.0)).volume
    folder = tmp_path / "mr"
    write_dicom_series(volume, folder)
    for path in folder.rglob("*"):
        if path.is_file():
            dataset = pydicom.dcmread(path)
            dataset.Modality = "MR"
            dataset.save_as(path)
    assert _run(["segment", str(folder), "--out", str(tmp_path / "a.nii.gz"), "--model", str(trained / "seg")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MR" in err[0] and "not CT" in err[0]

    # a 2D image
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(flat))
    assert _run(["segment", str(flat), "--out", str(tmp_path / "b.nii.gz"), "--model", str(trained / "seg")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flat.nii.gz" in err[0]

    # the TGH-MoE chat model folder, and a pre-training folder, are not segmenters
    scan, _ = _nifti_scan(tmp_path)
    chat = ROOT / "resources" / "demo-model"
    assert _run(["segment", str(scan), "--out", str(tmp_path / "c.nii.gz"), "--model", str(chat)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo-model" in err[0] and "not a Med3DInsight model" in err[0]
    assert _run(["segment", str(scan), "--out", str(tmp_path / "d.nii.gz"), "--model", str(trained / "pre")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Med3DPretrainModel" in err[0]
    assert not (tmp_path / "c.nii.gz").exists()


def test_position_channels_follow_the_body_box():
    from napari_tghmoe.med3d.data import position_channels

    hu = np.full((10, 12, 14), -1000.0, np.float32)
    hu[2:8, 3:10, 4:12] = 40.0  # the body: z 2..7, y 3..9, x 4..11
    channels = position_channels(hu)
    assert channels.shape == (3, 10, 12, 14)
    assert channels[0, 2, 0, 0] == pytest.approx(-1.0) and channels[0, 7, 5, 5] == pytest.approx(1.0)
    assert channels[1, 0, 3, 0] == pytest.approx(-1.0) and channels[1, 0, 9, 0] == pytest.approx(1.0)
    assert channels[2, 0, 0, 4] == pytest.approx(-1.0) and channels[2, 0, 0, 11] == pytest.approx(1.0)
    shifted = np.roll(hu, 2, axis=2)  # the same body elsewhere in the field of view: same values on it
    assert np.allclose(position_channels(shifted)[2][:, :, 6:14], channels[2][:, :, 4:12])


def _biased_seg_model(folder: Path, favoured: str, **overrides) -> Path:
    """A tiny segmentation model whose output favours one label everywhere (a known answer)."""
    import torch

    from napari_tghmoe.med3d.encoder import build_tiny_seg_model, load_seg_model

    build_tiny_seg_model(folder, **overrides)
    model = load_seg_model(folder)
    final = model.backbone.net.conv_final[2].conv
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-10.0)
        final.bias[model.config.label_names.index(favoured)] = 10.0
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_cascade_finding_model_decides_the_findings_on_its_own_grid(tmp_path):
    """The organ model's finding labels are ignored; the finer finding model's are drawn over organs."""
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "lung nodule")  # would call everything a nodule
    cyst_finder = _biased_seg_model(
        tmp_path / "cysts", "renal cyst", organ_names=[], working_spacing=[4.0, 4.0, 4.0]
    )
    quiet_finder = _biased_seg_model(tmp_path / "quiet", "background", organ_names=[], working_spacing=[4.0, 4.0, 4.0])

    alone_calls = []
    alone = segment_volume(volume, organs, progress=lambda done, total: alone_calls.append((done, total)))
    assert {f.kind for f in alone.findings} == {"lung nodule"}

    calls = []
    bundle = attach_finding_model(organs, cyst_finder, tmp_path / "bundle")
    assert json.loads((bundle / "config.json").read_text())["finding_model"] == "findings"
    result = segment_volume(volume, bundle, progress=lambda done, total: calls.append((done, total)))
    cyst = [v for v, n in result.label_names.items() if n == "renal cyst"][0]
    assert set(np.unique(result.labels).tolist()) == {cyst}
    assert {f.kind for f in result.findings} == {"renal cyst"}
    assert result.finding_presence.keys() >= {"renal cyst", "lung nodule"}
    # progress counts the windows of both models, the finder's finer grid after the organs'
    total = calls[0][1]
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert total > alone_calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)

    quiet = segment_volume(volume, attach_finding_model(organs, quiet_finder, tmp_path / "bundle2"))
    assert quiet.findings == []
    names = quiet.label_names
    from napari_tghmoe.med3d.encoder import DEFAULT_ORGANS

    assert all(names[v] in ("background", *DEFAULT_ORGANS) for v in np.unique(quiet.labels).tolist())


def test_a_finding_model_with_organs_or_foreign_kinds_is_refused(tmp_path):
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model
    from napari_tghmoe.med3d.types import SegModelError

    organs = build_tiny_seg_model(tmp_path / "organs")
    with pytest.raises(SegModelError, match="finding kinds only"):
        attach_finding_model(organs, build_tiny_seg_model(tmp_path / "full"), tmp_path / "out")
    foreign = build_tiny_seg_model(tmp_path / "foreign", organ_names=[], finding_kinds=["bone metastasis"])
    with pytest.raises(SegModelError, match="bone metastasis"):
        attach_finding_model(organs, foreign, tmp_path / "out")


def test_seg_bundle_cli_builds_a_cascade_or_says_why_not(tmp_path, capsys):
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model, read_folder_config

    organs = build_tiny_seg_model(tmp_path / "organs")
    finder = build_tiny_seg_model(tmp_path / "finder", organ_names=[], working_spacing=[4.0, 4.0, 4.0])
    assert _run(["seg-bundle", "--organs", str(organs), "--findings", str(finder), "--out", str(tmp_path / "b")]) == 0
    assert read_folder_config(tmp_path / "b", "Med3DSegModel").finding_model == "findings"
    assert read_folder_config(tmp_path / "b" / "findings", "Med3DSegModel").working_spacing == [4.0, 4.0, 4.0]
    capsys.readouterr()
    code = _run(["seg-bundle", "--organs", str(organs), "--findings", str(organs), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and str(organs) in err[0] and "finding kinds only" in err[0]
    verifier = _constant_verifier(tmp_path / "v", finder, "none")
    capsys.readouterr()
    assert _run(["seg-bundle", "--organs", str(organs), "--findings", str(finder), "--verifier", str(verifier),
                 "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verifier" in err[0]  # one line, no progress bars
    assert read_folder_config(tmp_path / "d" / "findings", "Med3DSegModel").finding_verifier == "verifier"
    code = _run(["seg-bundle", "--organs", str(organs), "--findings", str(finder), "--verifier", str(organs),
                 "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not a Med3DFindingVerifier" in err[0]


def test_organ_context_channels_mark_each_group_on_the_finer_grid():
    from napari_tghmoe.med3d.data import organ_context_channels

    names = ["background", "liver", "right kidney", "left kidney"]
    coarse = np.zeros((2, 2, 2), np.uint8)
    coarse[0, 0, 0] = 1  # liver
    coarse[1, 1, 1] = 3  # left kidney
    coarse[1, 0, 1] = 2  # right kidney
    channels = organ_context_channels(coarse, names, [["liver"], ["right kidney", "left kidney"]], (4, 4, 4))
    assert channels.shape == (2, 4, 4, 4)
    assert channels[0].sum() == 8 and channels[0][:2, :2, :2].all()  # one coarse voxel = 2x2x2 fine ones
    assert channels[1].sum() == 16 and channels[1][2:, 2:, 2:].all() and channels[1][2:, :2, 2:].all()
    assert not (channels[0] * channels[1]).any()


def test_a_context_reading_finding_model_gets_the_organ_labels_inside_its_cascade(tmp_path):
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model, load_seg_model
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.med3d.types import SegModelError
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = build_tiny_seg_model(tmp_path / "organs")
    groups = [["liver"], ["right kidney", "left kidney"]]
    finder = build_tiny_seg_model(tmp_path / "finder", organ_names=[], working_spacing=[4.0, 4.0, 4.0], context_groups=groups)
    assert load_seg_model(finder).config.in_channels == 2 + len(groups)
    with pytest.raises(SegModelError, match="organ model"):
        segment_volume(volume, finder)  # alone it has no organ labels to read
    result = segment_volume(volume, attach_finding_model(organs, finder, tmp_path / "bundle"))
    assert result.labels.shape == volume.shape
    stray = build_tiny_seg_model(tmp_path / "stray", organ_names=[], context_groups=[["pancreas"]])
    with pytest.raises(SegModelError, match="pancreas"):
        attach_finding_model(organs, stray, tmp_path / "bundle2")


def test_background_weight_makes_missed_findings_cost_more_than_false_ones():
    import torch

    from napari_tghmoe.med3d.finetune import segmentation_loss_for
    from napari_tghmoe.med3d.recipe import FinetuneSettings

    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1  # half the window is a finding
    right = torch.where(labels == 1, 1.0, 0.0).repeat(1, 2, 1, 1, 1)
    right[:, 0] = 1.0 - right[:, 1]
    wrong_background = right.clone()
    wrong_background[0, :, 2:] = wrong_background[0, :, 2:].flip(0)  # background voxels called finding
    wrong_finding = right.clone()
    wrong_finding[0, :, :2] = wrong_finding[0, :, :2].flip(0)  # finding voxels called background

    def cost(weight: float, logits: torch.Tensor) -> float:
        loss = segmentation_loss_for(FinetuneSettings(background_weight=weight, batch_dice=True), 2)
        return float(loss(logits * 8.0, labels))

    assert cost(0.1, wrong_background) < cost(1.0, wrong_background)
    # a missed finding now costs far more than background wrongly called finding
    weighted = cost(0.1, wrong_finding) / cost(0.1, wrong_background)
    plain = cost(1.0, wrong_finding) / cost(1.0, wrong_background)
    assert weighted > 2.0 * plain


def _renal_cyst_everywhere(folder: Path, kind: str = "renal cyst", **config) -> Path:
    """A 4 mm finding model that calls every voxel a renal cyst (or ``kind``), at p = e / (e + e^0.6) = 0.60."""
    import torch

    from napari_tghmoe.med3d.encoder import build_tiny_seg_model, load_seg_model

    folder = build_tiny_seg_model(folder, **{"organ_names": [], "working_spacing": [4.0, 4.0, 4.0], **config})
    model = load_seg_model(folder)
    final = model.backbone.net.conv_final[2].conv
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-20.0)
        final.bias[0] = 0.6
        final.bias[model.config.label_names.index(kind)] = 1.0
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_a_finding_where_its_kind_cannot_lie_is_no_finding(tmp_path):
    """finding_sites: a renal cyst must lie in a kidney; in the liver it is not one."""
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import SegModelError, attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "liver")  # every organ voxel is liver
    in_kidney = _renal_cyst_everywhere(tmp_path / "kidney", finding_sites={"renal cyst": ["right kidney", "left kidney"]})
    refused = segment_volume(volume, attach_finding_model(organs, in_kidney, tmp_path / "b1"))
    assert refused.findings == []
    assert set(np.unique(refused.labels).tolist()) == {1}
    anywhere = _renal_cyst_everywhere(tmp_path / "liver", finding_sites={"renal cyst": ["liver"]})
    kept = segment_volume(volume, attach_finding_model(organs, anywhere, tmp_path / "b2"))
    assert {f.kind for f in kept.findings} == {"renal cyst"}
    assert all(f.location == "liver" for f in kept.findings)
    stray = _renal_cyst_everywhere(tmp_path / "stray", finding_sites={"renal cyst": ["pancreas"]})
    with pytest.raises(SegModelError, match="finding sites pancreas"):
        attach_finding_model(organs, stray, tmp_path / "b3")


def test_unsure_finding_components_go_back_to_the_organs(tmp_path):
    """min_finding_probability: a component less sure than that is no finding, its voxels organs again."""
    import torch

    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model, load_seg_model
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "liver")

    def finder(name: str, threshold: float) -> Path:
        return _renal_cyst_everywhere(tmp_path / name, min_finding_probability=threshold)

    sure_enough = segment_volume(volume, attach_finding_model(organs, finder("f50", 0.5), tmp_path / "b50"))
    assert {f.kind for f in sure_enough.findings} == {"renal cyst"}
    assert all(0.55 < f.probability < 0.65 for f in sure_enough.findings)
    assert all(f.probability <= f.peak_probability < 0.65 for f in sure_enough.findings)
    too_unsure = segment_volume(volume, attach_finding_model(organs, finder("f70", 0.7), tmp_path / "b70"))
    assert too_unsure.findings == []
    assert set(np.unique(too_unsure.labels).tolist()) == {1}  # all liver again, as the organ model said
    assert "renal cyst" not in too_unsure.structure_volumes_ml


def test_lookalike_voxels_lie_on_the_named_structures_of_the_phantom():
    import dataclasses

    from napari_tghmoe.med3d.data import MAX_LOOKALIKE_VOXELS, lookalike_voxels, resample_nearest
    from napari_tghmoe.phantom import make_phantom

    phantom = make_phantom(2, "abdomen", spacing=(5.0, 5.0, 5.0))
    grid = tuple(n // 2 for n in phantom.labels.shape)
    voxels = lookalike_voxels(phantom, ["bowel"], grid)
    bowel = [v for v, name in phantom.label_names.items() if name == "bowel"]
    on_grid = resample_nearest(phantom.labels, grid)
    assert 0 < len(voxels) <= MAX_LOOKALIKE_VOXELS
    assert np.isin(on_grid[tuple(voxels.T)], bowel).all()
    assert np.array_equal(voxels, lookalike_voxels(phantom, ["bowel"], grid))  # seeded: the same each time
    empty = dataclasses.replace(phantom, labels=np.zeros_like(phantom.labels))
    assert lookalike_voxels(empty, ["bowel"], grid).shape == (0, 3)  # no bowel: nothing to aim at


def test_crop_centres_split_between_lesions_lookalikes_and_body():
    from napari_tghmoe.med3d.finetune import crop_centre_pool
    from napari_tghmoe.med3d.recipe import FinetuneSettings

    lesions, lookalikes, body = np.ones((2, 3)), np.full((5, 3), 2), np.zeros((9, 3))
    settings = FinetuneSettings(lesion_crop_fraction=0.5, lookalike_crop_fraction=0.3, lookalike_structures=["bowel"])
    draws = np.linspace(0.0, 0.999, 1000)
    pools = [crop_centre_pool(d, settings, lesions, lookalikes, body) for d in draws]
    shares = [np.mean([p is pool for p in pools]) for pool in (lesions, lookalikes, body)]
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.002)
    # a volume with nothing to aim at falls back to the body, never to an empty pool
    assert crop_centre_pool(0.6, settings, lesions, None, body) is body
    assert crop_centre_pool(0.1, settings, np.zeros((0, 3)), lookalikes, body) is body


def test_recipe_refuses_unknown_or_unbalanced_lookalikes(tmp_path):
    from napari_tghmoe.med3d.recipe import Med3DRecipeError, load_recipe

    base = TINY_RECIPE.read_text()
    with pytest.raises(Med3DRecipeError, match="not phantom structures.*bowel"):
        load_recipe(TINY_RECIPE, ["finetune.lookalike_crop_fraction=0.2", "finetune.lookalike_structures=['intestine']"])
    with pytest.raises(Med3DRecipeError, match="at most 1"):
        load_recipe(TINY_RECIPE, ["finetune.lesion_crop_fraction=0.8", "finetune.lookalike_crop_fraction=0.3",
                                  "finetune.lookalike_structures=['bowel']"])
    with pytest.raises(Med3DRecipeError, match="needs lookalike_structures"):
        load_recipe(TINY_RECIPE, ["finetune.lookalike_crop_fraction=0.2"])
    assert base == TINY_RECIPE.read_text()


def test_kind_sampling_draws_every_finding_kind_equally_however_large():
    """A 300 mL effusion must not take the crops a 3 mL nodule needs."""
    from types import SimpleNamespace

    from napari_tghmoe.med3d.finetune import draw_finding, finding_instances

    config = SimpleNamespace(finding_kinds=["lung nodule", "pleural effusion"], finding_label=lambda k: 1 + ["lung nodule", "pleural effusion"].index(k))
    first = np.zeros((20, 20, 20), np.uint8)
    first[:, :, :10] = 2  # one huge effusion
    first[15, 15, 15] = 1  # a one-voxel nodule
    second = np.zeros((20, 20, 20), np.uint8)
    second[2:4, 2:4, 2:4] = 1  # and two nodules apart from each other
    second[10:12, 10:12, 10:12] = 1
    instances = finding_instances([first, second], config)
    assert len(instances["pleural effusion"]) == 1 and len(instances["lung nodule"]) == 3
    assert sorted(len(v) for _, v in instances["lung nodule"]) == [1, 8, 8]
    nodule = [v for i, v in instances["lung nodule"] if i == 0][0]
    assert nodule.tolist() == [[15, 15, 15]]
    rng = np.random.default_rng(0)
    draws = [draw_finding(rng, instances) for _ in range(2000)]
    effusion_share = np.mean([len(v) == 4000 for _, v in draws])
    assert 0.45 < effusion_share < 0.55  # per voxel it would be 4000 / 4017


# --------------------------------------------------------------------------- the verifier


def _constant_verifier(folder: Path, finder: Path, winner: str) -> Path:
    """A verifier whose answer is ``winner`` ("none" or a finding kind) for every crop."""
    from napari_tghmoe.med3d.encoder import load_seg_model
    from napari_tghmoe.med3d.verifier import Med3DFindingVerifier, verifier_config

    config = verifier_config(load_seg_model(finder).config, [16, 16, 16], [4, 8], 0.5)
    model = Med3DFindingVerifier(config)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-10.0)
        last.bias[0 if winner == "none" else 1 + config.finding_kinds.index(winner)] = 10.0
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_the_verifier_has_the_last_word_on_each_proposal(tmp_path):
    """A proposal the verifier calls no finding goes back to the organs; one it confirms stays."""
    import dataclasses

    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import SegModelError, attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "liver")
    finder = _renal_cyst_everywhere(tmp_path / "finder")
    no = _constant_verifier(tmp_path / "no", finder, "none")
    rejected = segment_volume(volume, attach_finding_model(organs, finder, tmp_path / "b-no", verifier_dir=no))
    assert rejected.findings == []
    assert set(np.unique(rejected.labels).tolist()) == {1}
    yes = _constant_verifier(tmp_path / "yes", finder, "renal cyst")
    kept = segment_volume(volume, attach_finding_model(organs, finder, tmp_path / "b-yes", verifier_dir=yes))
    assert {f.kind for f in kept.findings} == {"renal cyst"}
    assert all(f.verifier_probability > 0.99 for f in kept.findings)
    from napari_tghmoe.segmentation_layers import finding_row

    assert finding_row(kept.findings[0]).endswith(", checked 1.00")  # the dock's list shows the second look
    assert "checked" not in finding_row(dataclasses.replace(kept.findings[0], verifier_probability=None))
    assert (tmp_path / "b-yes" / "findings" / "verifier" / "model.safetensors").is_file()
    # a verifier of another finding model (other kinds) is refused with the folder named
    other = _renal_cyst_everywhere(tmp_path / "other", finding_kinds=["renal cyst", "lung nodule"])
    stray = _constant_verifier(tmp_path / "stray", other, "none")
    with pytest.raises(SegModelError, match="stray: this verifier was trained for another finding model"):
        attach_finding_model(organs, finder, tmp_path / "b-stray", verifier_dir=stray)


def test_an_ensemble_of_verifiers_gives_the_mean_of_its_members(tmp_path):
    """Two verifiers, one sure it is a cyst and one sure it is not: the bundled ensemble says 0.5
    for each proposal, keeps them at a cut of 0.4 and survives the folder round trip."""
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import SegModelError, attach_finding_model
    from napari_tghmoe.med3d.verifier import VerifierEnsemble, load_verifier, verify
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "liver")
    finder = _renal_cyst_everywhere(tmp_path / "finder")
    no = _constant_verifier(tmp_path / "no", finder, "none")
    yes = _constant_verifier(tmp_path / "yes", finder, "renal cyst")
    assert _run(["seg-bundle", "--organs", str(organs), "--findings", str(finder), "--verifier", str(yes), str(no),
                 "--out", str(tmp_path / "both")]) == 0
    folder = tmp_path / "both" / "findings" / "verifier"
    assert (folder / "member-1" / "model.safetensors").is_file()
    ensemble = load_verifier(folder)
    assert isinstance(ensemble, VerifierEnsemble) and len(ensemble.members) == 2
    image = np.random.default_rng(0).random((ensemble.config.in_channels, 20, 20, 20)).astype(np.float32)
    candidate = [("renal cyst", np.argwhere(np.ones((2, 2, 2))) + 8)]
    alone = [verify(load_verifier(v), image, candidate)[0] for v in (yes, no)]
    assert alone[0] > 0.99 and alone[1] < 0.01
    assert verify(ensemble, image, candidate)[0] == pytest.approx(np.mean(alone), abs=1e-6)
    config_path = folder / "config.json"
    config_path.write_text(config_path.read_text().replace('"verifier_min_probability": 0.5', '"verifier_min_probability": 0.4'))
    kept = segment_volume(volume, tmp_path / "both")  # the mean, 0.5, passes a cut of 0.4
    assert kept.findings and all(f.verifier_probability == pytest.approx(0.5, abs=0.01) for f in kept.findings)
    # a member for another finding model is refused, the member folder named
    other = _renal_cyst_everywhere(tmp_path / "other", finding_kinds=["renal cyst", "lung nodule"])
    stray = _constant_verifier(folder / "member-1", other, "none")
    with pytest.raises(SegModelError, match="member-1: this ensemble member checks another finding model"):
        load_verifier(folder)
    assert stray == folder / "member-1"


def test_train_verifier_learns_from_the_finding_models_own_proposals(tmp_path):
    """Mined classes: the finder's proposal is a look-alike unless it touches a true finding of its kind."""
    from napari_tghmoe.med3d.data import iter_phantoms
    from napari_tghmoe.med3d.verifier import CANDIDATES_NAME, CandidateSet, load_verifier

    finder = _renal_cyst_everywhere(tmp_path / "finder", working_spacing=[8.0, 8.0, 8.0])
    data = "phantom:seeds=0-1,region=both,spacing=8x8x8"
    settings = [
        f"verifier.data=['{data}']", "verifier.crop_size=[16,16,16]", "verifier.channels=[4,8]",
        "verifier.steps=3", "verifier.batch_size=2", "verifier.log_every=1", "verifier.warmup_steps=1",
        "verifier.truth_data=['phantom:seeds=2-2,region=both,spacing=8x8x8']",  # true findings only, no proposals
    ]
    args = ["train-verifier", "--config", str(TINY_RECIPE), "--findings", str(finder), "--out", str(tmp_path / "v"), "--no-progress"]
    assert _run(args + [x for s in settings for x in ("--set", s)]) == 0
    mined = CandidateSet.load(tmp_path / "v" / CANDIDATES_NAME)
    from napari_tghmoe.med3d.encoder import load_seg_model

    kinds = load_seg_model(finder).config.finding_kinds
    phantoms = list(iter_phantoms(data))
    cysts = [sum(f.kind == "renal cyst" for f in p.findings) for p in phantoms]
    true_findings = sum(sum(f.kind in kinds for f in p.findings) for p in phantoms + list(iter_phantoms(
        "phantom:seeds=2-2,region=both,spacing=8x8x8")))
    proposals = mined.proposed == 1
    assert proposals.sum() == len(phantoms)  # "renal cyst" everywhere: one component per volume
    cyst_class = 1 + kinds.index("renal cyst")
    assert sorted(mined.targets[proposals].tolist()) == sorted(cyst_class if c else 0 for c in cysts)
    assert (~proposals).sum() == true_findings and (mined.targets[~proposals] > 0).all()
    assert mined.crops.shape[1:] == (len(load_seg_model(finder).config.ct_windows) + 1, 16, 16, 16)
    assert set(np.unique(mined.crops[:, -1]).tolist()) <= {0.0, 1.0}  # the candidate's mask channel
    verifier = load_verifier(tmp_path / "v")
    assert verifier.config.patch_size == [16, 16, 16] and verifier.config.verifier_min_probability == 0.5
    log = [json.loads(line) for line in (tmp_path / "v" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["total"]) for e in log)


def test_the_second_look_is_the_mean_over_the_eight_flips_of_the_crop(tmp_path):
    from napari_tghmoe.med3d.encoder import load_seg_model
    from napari_tghmoe.med3d.verifier import Med3DFindingVerifier, candidate_crop, verifier_config, verify

    finder = _renal_cyst_everywhere(tmp_path / "finder")
    torch.manual_seed(1)
    verifier = Med3DFindingVerifier(verifier_config(load_seg_model(finder).config, [16, 16, 16], [4, 8], 0.5)).eval()
    image = np.random.default_rng(0).random((verifier.config.in_channels, 24, 24, 24)).astype(np.float32)
    voxels = np.array([[12, 12, 12], [12, 13, 12]])
    crop = torch.from_numpy(candidate_crop(image, voxels, [16, 16, 16]))[None]
    kind = verifier.config.finding_kinds.index("renal cyst") + 1
    with torch.no_grad():
        views = [torch.softmax(verifier(torch.flip(crop, axes)), 1)[0, kind] for axes in
                 [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]]
    assert verify(verifier, image, [("renal cyst", voxels)])[0] == pytest.approx(float(torch.stack(views).mean()), abs=1e-5)
    assert float(torch.stack(views).std()) > 0  # a random verifier does see the flips differently


def test_a_component_too_small_to_report_is_not_left_labelled_as_a_finding(tmp_path):
    """The label map and the findings list agree: no finding voxels without a reported finding."""
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    organs = _biased_seg_model(tmp_path / "organs", "liver", min_finding_ml=1e6)  # the cascade's size rule
    finder = _renal_cyst_everywhere(tmp_path / "finder")
    result = segment_volume(volume, attach_finding_model(organs, finder, tmp_path / "bundle"))
    assert result.findings == []
    assert set(np.unique(result.labels).tolist()) == {1}
    assert "renal cyst" not in result.structure_volumes_ml
    assert result.structure_volumes_ml["liver"] == pytest.approx(volume.hu.size * np.prod(volume.spacing) / 1000, rel=1e-3)


# --------------------------------------------------------------------------- oblique series


def _oblique_coronal_volume() -> CTVolume:
    """A synthetic coronal series turned 25 degrees in its plane: array axes (k, j, i) ~ (P, -S, L)."""
    c, s = math.cos(math.radians(25.0)), math.sin(math.radians(25.0))
    coronal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    about_p = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return CTVolume(hu=np.zeros((30, 26, 34), np.int16), spacing=(5.0, 3.0, 4.0), origin=(-40.0, 12.5, 300.0),
                    direction=about_p @ coronal)


def test_an_oblique_scan_goes_to_the_patient_axes_and_its_labels_come_back():
    """patient_axis_grid: trilinear HU on the patient axes is exact for a linear field; labels round-trip."""
    from scipy import ndimage

    from napari_tghmoe.io._geometry import orientation_name
    from napari_tghmoe.io._types import AXIAL_DIRECTION
    from napari_tghmoe.med3d.segment import is_oblique, patient_axis_grid
    from napari_tghmoe.phantom import make_phantom

    phantom = make_phantom(3, "abdomen", spacing=(8.0, 6.0, 7.0), plane="oblique")
    assert orientation_name(phantom.volume.direction) == "oblique" and is_oblique(phantom.volume.direction)
    for plane in ("axial", "coronal", "sagittal"):
        assert not is_oblique(make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0), plane=plane).volume.direction)
    in_plane_turn = _oblique_coronal_volume()
    assert orientation_name(in_plane_turn.direction) == "coronal" and is_oblique(in_plane_turn.direction)

    for volume, spacing in ((phantom.volume, (8.0, 6.0, 7.0)), (in_plane_turn, (3.0, 5.0, 4.0))):
        grid = patient_axis_grid(volume)
        assert grid.spacing == pytest.approx(spacing)  # each scan spacing on its nearest patient axis
        # every scan voxel centre lies on the grid
        corners = np.array(np.meshgrid(*[(0, n - 1) for n in volume.shape], indexing="ij")).reshape(3, -1).T
        inside = np.linalg.solve(grid.matrix, (corners - grid.offset).T).T
        assert (inside > -1e-6).all() and (inside < np.asarray(grid.shape) - 1 + 1e-6).all()

        def field(index_to_lps, shape):  # HU rising 1, 2 and 3 per mm along x, y, z
            index = np.indices(shape).reshape(3, -1).astype(float)
            return (np.array([1.0, 2.0, 3.0]) @ index_to_lps(index)).reshape(shape)

        scan_field = field(lambda i: np.asarray(volume.origin)[:, None] + volume.direction @ (np.asarray(volume.spacing)[:, None] * i), volume.shape)
        grid_field = field(lambda i: np.asarray(grid.origin)[:, None] + AXIAL_DIRECTION @ (np.asarray(grid.spacing)[:, None] * i), grid.shape)
        resampled = grid.to_grid(scan_field, order=1, cval=-1024.0, dtype=np.float64)
        scan_index = (grid.matrix @ np.indices(grid.shape).reshape(3, -1) + grid.offset[:, None]).T.reshape(*grid.shape, 3)
        covered = ((scan_index > 1e-6) & (scan_index < np.asarray(volume.shape) - 1 - 1e-6)).all(axis=-1)
        assert covered.mean() > 0.2
        assert np.allclose(resampled[covered], grid_field[covered], atol=1e-6)
        assert (resampled[~((scan_index > -1) & (scan_index < np.asarray(volume.shape))).all(axis=-1)] == -1024.0).all()

        block = np.zeros(volume.shape, np.uint8)
        block[tuple(slice(n // 4, n - n // 4) for n in volume.shape)] = 7
        back = grid.to_scan(grid.to_grid(block, order=0, cval=0), volume.shape)
        assert back.shape == volume.shape and back.dtype == np.uint8
        cube = np.ones((3, 3, 3), bool)
        assert (back[ndimage.binary_erosion(block > 0, cube)] == 7).all()
        assert (back[~ndimage.binary_dilation(block > 0, cube)] == 0).all()


def test_segment_volume_of_an_oblique_series_answers_on_the_scans_own_grid(tmp_path):
    """Labels, findings (voxels of their own kind, positions, mL) on the oblique scan's own grid, and a warning."""
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import OBLIQUE_WARNING, attach_finding_model
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0), plane="oblique").volume
    organs = _biased_seg_model(tmp_path / "organs", "liver")
    bundle = attach_finding_model(organs, _renal_cyst_everywhere(tmp_path / "finder"), tmp_path / "bundle")
    result = segment_volume(volume, bundle)
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    assert OBLIQUE_WARNING in result.warnings
    cyst = [v for v, n in result.label_names.items() if n == "renal cyst"][0]
    assert [f.kind for f in result.findings] == ["renal cyst"]
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    for finding in result.findings:
        assert result.labels[finding.voxel_zyx] == finding.label == cyst
        assert np.allclose(finding.position_mm, volume.index_to_patient(finding.voxel_zyx), atol=0.01)
        assert finding.voxel_count == int((result.labels == cyst).sum())
        assert finding.volume_ml == pytest.approx(finding.voxel_count * voxel_ml, abs=1e-3)
    # the finder calls all of the body's box a cyst: every body voxel of the scan, not the far air
    assert (result.labels[volume.hu > -500] == cyst).all() and (result.labels == 0).any()
    assert set(np.unique(result.labels).tolist()) == {0, cyst}
    assert result.structure_volumes_ml == {"renal cyst": pytest.approx(result.findings[0].voxel_count * voxel_ml, abs=1e-3)}

    model = _biased_seg_model(tmp_path / "nodules", "lung nodule")  # one model, no cascade
    alone = segment_volume(volume, model)
    assert OBLIQUE_WARNING in alone.warnings and alone.labels.shape == volume.shape
    assert alone.findings and all(alone.labels[f.voxel_zyx] == f.label for f in alone.findings)
    axial = segment_volume(make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0)).volume, model)
    assert axial.warnings == []  # axis-aligned: not resampled


def _lung_crop(mask_region: str) -> tuple[np.ndarray, object]:
    """A 32^3 verifier crop in aerated lung holding a 12-voxel ball (not labelled lung, as the organ
    model leaves nodules) and a vessel that runs out of the crop; the mask marks part of one."""
    from types import SimpleNamespace

    config = SimpleNamespace(
        ct_windows=[[-600.0, 1500.0], [40.0, 400.0]],
        context_groups=[["liver"], ["right upper lobe", "right lower lobe"]],
    )
    z, y, x = np.mgrid[:32, :32, :32]
    ball = (z - 16) ** 2 + (y - 16) ** 2 + (x - 10) ** 2 <= 36
    vessel = ((y - 16) ** 2 + (x - 26) ** 2 <= 4)  # along z, through both faces of the crop
    hu = np.full((32, 32, 32), -850.0)
    hu[ball | vessel] = 40.0
    crop = np.zeros((5, 32, 32, 32), dtype=np.float32)
    crop[0] = np.clip((hu + 1350.0) / 1500.0, 0, 1)
    crop[3] = ~(ball | vessel)  # lungs: everything but the dense structures
    structure = ball if mask_region == "ball" else vessel
    crop[4] = structure & (z >= 16)  # the finder's partial component
    return crop, config


def test_a_partial_mask_on_a_lung_nodule_grows_to_the_whole_ball_but_not_along_a_vessel():
    """The verifier sees a nodule's own extent, not the finder's partial guess; a vessel that leaves
    the crop is not enclosed by the lungs and stays as proposed."""
    from napari_tghmoe.med3d.verifier import grow_lung_mask

    crop, config = _lung_crop("ball")
    grown = grow_lung_mask(crop, config)
    z, y, x = np.mgrid[:32, :32, :32]
    ball = (z - 16) ** 2 + (y - 16) ** 2 + (x - 10) ** 2 <= 36
    np.testing.assert_array_equal(grown[-1] > 0.5, ball)
    np.testing.assert_array_equal(grown[:-1], crop[:-1])  # the image channels are untouched

    vessel_crop, _ = _lung_crop("vessel")
    np.testing.assert_array_equal(grow_lung_mask(vessel_crop, config)[-1], vessel_crop[-1])

    outside = crop.copy()
    outside[3] = 0.0  # not in the lungs (an abdominal candidate): left as proposed
    np.testing.assert_array_equal(grow_lung_mask(outside, config)[-1], crop[-1])
