"""The demo's auxiliary vision loss: labels land on the right visual token, and training with it
teaches the probe while the saved model stays a plain TGH-MoE checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_tghmoe.train.vision_probe import KINDS, LOCATIONS, lesion_patch_targets

ROOT = Path(__file__).resolve().parents[1]
GRID = (32, 64, 96)  # temporal patch 2, patch 16, merge 2 -> tokens (16, 2, 3), 4 patches each


def _targets(lesions, findings, field="kind", vocabulary=KINDS):
    return lesion_patch_targets(lesions, findings, GRID, temporal_patch=2, patch=16, merge=2, field=field, vocabulary=vocabulary)


def _patch_grid(targets):
    """Targets in the merger's order (tokens, 4, words) -> (slabs 16, rows 4, columns 6, words)."""
    words = targets.shape[-1]
    return targets.reshape(16, 2, 3, 2, 2, words).transpose(0, 1, 3, 2, 4, 5).reshape(16, 4, 6, words) > 0.5


def _footprint(patch_index: int, patch: int, source: int, grid: int) -> np.ndarray:
    """Source indices that feed one patch of ``patch`` grid voxels along an axis of ``source``
    voxels resampled to ``grid``: torch's adaptive average pooling windows when shrinking
    (``floor(i S / G)`` to ``ceil((i + 1) S / G)``), the two trilinear neighbours with a non-zero
    weight when growing (``align_corners=False``), the voxels themselves when equal."""
    cells = range(patch_index * patch, (patch_index + 1) * patch)
    if source == grid:
        return np.array(list(cells))
    if source > grid:
        return np.arange(int(np.floor(cells[0] * source / grid)), int(np.ceil((cells[-1] + 1) * source / grid)))
    used = set()
    for cell in cells:
        coordinate = max((cell + 0.5) * source / grid - 0.5, 0.0)
        low = int(np.floor(coordinate))
        used.add(min(low, source - 1))
        if coordinate > low:
            used.add(min(low + 1, source - 1))
    return np.array(sorted(used))


def _patches_holding(lesions, values):
    """(16, 4, 6): the patches of the model grid whose footprint in the volume holds a voxel of
    ``values`` (computed from the resampling's geometry, not through the code under test)."""
    mask = np.isin(lesions, values)
    shape, patches = mask.shape, (2, 16, 16)
    holding = np.zeros((16, 4, 6), dtype=bool)
    for index in np.ndindex(holding.shape):
        z, y, x = (_footprint(i, p, s, g) for i, p, s, g in zip(index, patches, shape, GRID))
        holding[index] = mask[np.ix_(z, y, x)].any()
    return holding


def test_a_small_lesion_marks_exactly_its_own_patch():
    lesions = np.zeros(GRID, dtype=np.uint8)
    lesions[5, 40:42, 70:72] = 1
    targets = _targets(lesions, [{"kind": "lung nodule", "location": "right upper lobe"}])
    assert targets.shape == (16 * 2 * 3, 4, len(KINDS))
    # slab 5 // 2 = 2, patch row 40 // 16 = 2 (block 1, row 0), patch column 70 // 16 = 4 (block 2, column 0)
    token, patch = 2 * (2 * 3) + 1 * 3 + 2, 0
    assert targets[token, patch, KINDS.index("lung nodule")] == 1.0
    assert targets.sum() == 1.0


def test_labels_follow_the_mask_through_the_images_resampling():
    """A volume twice the grid in-plane: the lesion lands on the patch its voxels are averaged into,
    and a lesion that straddles a patch border in the volume marks both patches."""
    lesions = np.zeros((32, 128, 192), dtype=np.uint8)
    lesions[5, 81:84, 141:144] = 1  # -> grid voxels (5, 40-41, 70-71): the patch of the test above
    lesions[20, 62:66, 10:12] = 2  # -> grid rows 31-32: patch rows 1 and 2
    findings = [{"kind": "renal cyst"}, {"kind": "hypodense splenic lesion"}]
    targets = _targets(lesions, findings)
    token = 2 * (2 * 3) + 1 * 3 + 2
    assert targets[token, 0, KINDS.index("renal cyst")] == 1.0
    assert targets[..., KINDS.index("renal cyst")].sum() == 1.0
    splenic = _patch_grid(targets)[..., KINDS.index("hypodense splenic lesion")]
    assert np.argwhere(splenic).tolist() == [[10, 1, 0], [10, 2, 0]]


def test_an_effusion_marks_every_patch_of_its_fluid_and_nothing_else():
    lesions = np.zeros(GRID, dtype=np.uint8)
    lesions[4:28, 40:60, 2:30] = 1  # a crescent's bounding block: many patches, far from a cube of its depth
    targets = _targets(lesions, [{"kind": "pleural effusion", "location": "right pleural space"}])
    marked = _patch_grid(targets)[..., KINDS.index("pleural effusion")]
    np.testing.assert_array_equal(marked, _patches_holding(lesions, [1]))
    assert marked.sum() == 12 * 2 * 2  # slabs 2-13, rows 2-3, columns 0-1
    assert targets[..., KINDS.index("lung nodule")].sum() == 0
    assert _targets(np.zeros(GRID, dtype=np.uint8), []).sum() == 0


@pytest.mark.parametrize("field, vocabulary", [("kind", KINDS), ("location", LOCATIONS)])
def test_on_phantoms_a_patch_is_positive_exactly_when_it_holds_a_voxel_of_the_finding(tmp_path, monkeypatch, field, vocabulary):
    """What training reads (the phantom cache's volume with its mask, through ``sample_patch_targets``):
    every positive patch holds a lesion voxel of that kind, and every patch holding one is positive.
    The bounding-box targets once used failed both (``scripts/probe_target_coverage.py``, commit 1b24178)."""
    from napari_tghmoe.train.data import load_dataset_spec, load_sample_volume
    from napari_tghmoe.train.vision_probe import sample_patch_targets

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    samples = load_dataset_spec("phantom:seeds=0-7,region=both,shape=32x64x96", task="report")
    shapes = set()
    seen = set()
    for sample in samples:
        volume = load_sample_volume(sample)
        lesions = volume.metadata["phantom_lesions"]
        findings = sample.meta["phantom_findings"]
        shapes.add(lesions.shape)
        positive = _patch_grid(sample_patch_targets(volume, findings, GRID, 2, 16, 2, field=field, vocabulary=vocabulary))
        for word, name in enumerate(vocabulary):
            values = [i + 1 for i, finding in enumerate(findings) if finding[field] == name]
            holding = _patches_holding(lesions, values)
            np.testing.assert_array_equal(positive[..., word], holding, err_msg=f"{sample.meta['id']}: {name}")
            if holding.any():
                seen.add(findings[values[0] - 1]["kind"])
    assert {"pleural effusion", "lung nodule"} <= seen  # the test saw a large and a small finding
    assert len(shapes) > 1  # volumes stored in other planes: resampled onto the grid, shrinking and growing


def test_a_phantom_volume_without_its_mask_is_an_error_not_box_labels():
    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.train.vision_probe import sample_patch_targets

    volume = CTVolume(np.zeros(GRID, dtype=np.int16), spacing=(10.0, 4.0, 4.0))
    finding = {"kind": "renal cyst", "location": "left kidney, upper pole", "center_voxel": [5, 40, 70], "size_mm": 8.0}
    with pytest.raises(ValueError, match="phantom-7-report-0: phantom findings but no lesion mask"):
        sample_patch_targets(volume, [finding], GRID, 2, 16, 2, sample_id="phantom-7-report-0")
    assert sample_patch_targets(volume, [], GRID, 2, 16, 2).sum() == 0  # nothing to find: no mask needed


def test_training_with_the_probe_logs_its_loss_keeps_the_heads_out_of_the_model_and_in_the_checkpoints(
    tmp_path, monkeypatch
):
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    from napari_tghmoe.train.cli import load_recipe_with_overrides
    from napari_tghmoe.train.trainer import train

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TGHMOE_TRAIN_THREADS", "1")
    recipe = load_recipe_with_overrides(
        str(ROOT / "recipes" / "tiny-test.toml"),
        [
            "stage1.vision_probe_coef=1.0",
            "stage1.vision_probe_presence=1.0",
            "stage1.vision_probe_dense=hard",
            "stage1.lm_loss_per_sample=true",
            "stage1.steps=3",
            "stage1.log_every=1",
            "stage1.save_every=3",
        ],
    )
    result = train(recipe, 1, tmp_path / "run", progress=False)
    assert result.finished
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    for entry in log:
        assert isinstance(entry["probe"], float) and np.isfinite(entry["probe"])
        assert isinstance(entry["lm_per_sample"], float) and np.isfinite(entry["lm_per_sample"])
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert not any(part in key for key in saved for part in ("probe", "patch_kinds", "patch_locations"))
    heads = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000003" / "vision_probe.safetensors"))
    assert {key.split(".")[0] for key in heads} == {"patch_kinds", "patch_locations", "phase"}
    from napari_tghmoe.train.vision_probe import KINDS, make_probe

    probe = make_probe(heads["phase.weight"].shape[1], heads["patch_kinds.weight"].shape[0] // len(KINDS))
    probe.load_state_dict(heads)  # the script's --probe path: the heads load back as they were


@pytest.mark.parametrize("dense", ["balanced", "hard"])
def test_the_probe_loss_teaches_the_vision_tower_on_a_fixed_batch(tmp_path, monkeypatch, dense):
    torch = pytest.importorskip("torch")
    from napari_tghmoe.train.data import collate, load_dataset_spec
    from napari_tghmoe.train.recipe import load_recipe
    from napari_tghmoe.train.trainer import build_model, build_tokenizer_for, preload_volumes
    from napari_tghmoe.train.vision_probe import VisionProbeLoss, make_probe

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / "tiny-test.toml")
    samples = [s for s in load_dataset_spec("phantom:seeds=0-3,region=both,shape=8x64x64", task="report")]
    preload_volumes(samples)
    assert any(s.meta["phantom_findings"] for s in samples)
    tokenizer = build_tokenizer_for(recipe, samples)
    model = build_model(recipe, tokenizer=tokenizer)
    vision = model.config.vision_config
    probe = make_probe(int(vision.out_hidden_size), int(vision.spatial_merge_size) ** 2)
    probe_loss = VisionProbeLoss(model, probe, presence=1.0, dense=dense, hardest=4)
    batch = collate(samples, tokenizer, model.config)
    optimizer = torch.optim.Adam([*model.model.visual.parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    for _ in range(15):
        probe_loss.reset()
        model(**{k: v for k, v in batch.items() if k != "labels"})
        loss = probe_loss.loss(samples, model.config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    probe_loss.close()
    assert losses[-1] < 0.8 * losses[0]


def test_balanced_loss_does_not_let_empty_cells_hide_a_missed_finding():
    torch = pytest.importorskip("torch")
    from napari_tghmoe.train.vision_probe import balanced_bce

    target = torch.zeros(96, 4, len(KINDS))
    target[10, 0, 2] = 1.0
    confident_empty = torch.full_like(target, -8.0)  # says "nothing anywhere", misses the finding
    assert float(torch.nn.functional.binary_cross_entropy_with_logits(confident_empty, target)) < 0.01
    assert float(balanced_bce(confident_empty, target)) > 3.0
    found = confident_empty.clone()
    found[10, 0, 2] = 8.0
    assert float(balanced_bce(found, target)) < 0.01


def test_presence_loss_tells_a_head_that_only_knows_anatomy_from_one_that_sees_the_lesion():
    """Two volumes, one with a lesion at patch (10, 0), one without. A head that fires at that
    patch in both (where such lesions *can* be) passes the per-patch loss of the first volume,
    but the volume-level presence loss of the lesion-free one is high; firing only where the
    lesion is passes both."""
    torch = pytest.importorskip("torch")
    from napari_tghmoe.train.vision_probe import volume_presence_loss

    kind = KINDS.index("renal cyst")
    with_lesion = torch.zeros(96, 4, len(KINDS))
    with_lesion[10, 0, kind] = 1.0
    without = torch.zeros_like(with_lesion)
    anatomy_only = torch.full_like(with_lesion, -8.0)
    anatomy_only[10, 0, kind] = 8.0  # the same output whatever the volume holds
    assert float(volume_presence_loss(anatomy_only, with_lesion)) < 0.01
    assert float(volume_presence_loss(anatomy_only, without)) > 1.0
    sees_nothing_there = torch.full_like(with_lesion, -8.0)
    assert float(volume_presence_loss(sees_nothing_there, without)) < 0.01
    # by hand: the present word at logit 8 costs -log sigmoid(8), each absent word at logit -8
    # costs -log(1 - sigmoid(-8)); both equal softplus(-8), and so does their mean
    expected = torch.nn.functional.softplus(torch.tensor(-8.0))
    torch.testing.assert_close(volume_presence_loss(anatomy_only, with_lesion), expected)


def test_hard_negative_loss_punishes_lighting_up_the_whole_organ_that_balanced_loss_forgives():
    """One volume of 1,000 cells, an organ of 20 cells, a lesion on 2 of them. A head that fires
    on the whole organ (anatomy only) ranks the lesion above 980 cells and the balanced BCE barely
    minds; against the hardest negatives (the organ's other cells) it costs as much as a miss.
    A head that fires on the lesion alone passes both."""
    torch = pytest.importorskip("torch")
    from napari_tghmoe.train.vision_probe import balanced_bce, hard_negative_bce

    target = torch.zeros(1, 1000)
    target[0, [3, 4]] = 1.0
    organ = torch.full_like(target, -8.0)
    organ[0, :20] = 8.0
    assert float(balanced_bce(organ, target)) < 0.2
    assert float(hard_negative_bce(organ, target, hardest=8)) > 3.5
    lesion = torch.full_like(target, -8.0)
    lesion[0, [3, 4]] = 8.0
    assert float(hard_negative_bce(lesion, target, hardest=8)) < 0.01
    # by hand: positives at 8 cost softplus(-8); the 8 hardest negatives are organ cells at 8,
    # each costing softplus(8); half each
    expected = 0.5 * torch.nn.functional.softplus(torch.tensor(-8.0)) + 0.5 * torch.nn.functional.softplus(torch.tensor(8.0))
    torch.testing.assert_close(hard_negative_bce(organ, target, hardest=8), expected)
    # a unit without positives is scored on its hardest negatives alone
    empty = torch.zeros(1, 1000)
    torch.testing.assert_close(hard_negative_bce(organ, empty, hardest=8), torch.nn.functional.softplus(torch.tensor(8.0)))


# ------------------------------------------------------------------ tghmoe probe-detection


def test_auc_is_the_chance_that_a_positive_outscores_a_negative():
    from napari_tghmoe.train.detection import auc

    labels = np.array([False, False, True, True, False])
    # pairs (positive, negative): 0.35 beats 0.1 and 0.2 but not 0.4; 0.8 beats all three; 5 of 6
    assert auc(np.array([0.1, 0.4, 0.35, 0.8, 0.2]), labels) == pytest.approx(5 / 6)
    assert auc(np.array([0.5, 0.5, 0.5, 0.5, 0.5]), labels) == pytest.approx(0.5)  # ties count half


def test_volume_auc_of_a_kind_counts_only_the_volumes_of_its_regions():
    """A chest volume can hold no renal cyst: its scores must not count for or against the cyst
    (a head that lights up on lungs would otherwise look like a cyst detector), while lymph nodes
    occur in both regions; a kind without both positive and negative volumes has no AUC."""
    from napari_tghmoe.train.detection import volume_detection_auc

    cyst, node, nodule = KINDS.index("renal cyst"), KINDS.index("enlarged lymph node"), KINDS.index("lung nodule")
    regions = ["abdomen", "abdomen", "abdomen", "chest", "chest"]
    scores = np.zeros((5, len(KINDS)))
    present = np.zeros((5, len(KINDS)), dtype=bool)
    scores[:, cyst] = [0.9, 0.1, 0.2, 5.0, 5.0]  # the chest volumes outscore every abdomen
    present[:, cyst] = [True, False, False, False, False]
    scores[:, node] = [0.1, 0.2, 0.3, 0.9, 0.0]
    present[:, node] = [False, False, False, True, False]
    present[:, nodule] = [False, False, False, True, True]  # every chest volume has one: no AUC
    result = volume_detection_auc(scores, present, regions)
    assert result["renal cyst"] == pytest.approx(1.0)  # 0.9 vs 0.1, 0.2 within the abdomen
    assert result["enlarged lymph node"] == pytest.approx(1.0)  # over all five volumes
    assert "lung nodule" not in result
    assert set(result) == {"renal cyst", "enlarged lymph node"}


def test_tghmoe_probe_detection_trains_the_tower_alone_and_saves_what_it_measured(tiny_tghmoe_folder, tmp_path, monkeypatch, capsys):
    """The command behind docs/results.md's detection tables, end to end on the tiny model: AUCs at
    step 0, vision-only steps, AUCs again; the saved tower and heads, read back with ``--probe``,
    give at step 0 exactly the AUCs the training run printed last, and the LLM is untouched."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from napari_tghmoe.cli import main

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    held_out = "phantom:seeds=100000-100011,region=both,shape=16x64x64"
    out = tmp_path / "tower"
    argv = ["probe-detection", str(tiny_tghmoe_folder), "--data", held_out, "--train-data",
            "phantom:seeds=0-3,region=both,shape=16x64x64", "--vision-only-steps", "2", "--every", "1",
            "--batch-size", "2", "--lr", "1e-2", "--threads", "1", "--save", str(out)]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0].split(" loss")[0] for line in lines] == ["step 0", "step 1", "step 2"]
    last = lines[-1].split(": ", 1)[1]
    assert "enlarged lymph node" in last  # kinds with positive and negative held-out volumes are measured
    assert (out / "vision_probe.safetensors").is_file() and (out / "model.safetensors").is_file()

    assert main(["probe-detection", str(out), "--data", held_out, "--probe", str(out / "vision_probe.safetensors"),
                 "--threads", "1"]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert again == [f"step 0: {last}"]

    before, after = load_file(str(Path(tiny_tghmoe_folder) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.split(".")[0] == "visual" for name in changed)
