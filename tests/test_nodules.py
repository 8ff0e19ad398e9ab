"""The lung-nodule stage: a ball is a nodule, a vessel is not, at the scan's own spacing (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_tghmoe.med3d.nodules import (
    BallMeasure,
    NoduleShapeStage,
    ball_measure,
    fit_nodule_stage,
)

#: The phantoms' (and many chest CTs') voxels: 2.5 mm slices, 1.5 mm in-plane.
SPACING = (2.5, 1.5, 1.5)
LUNG_HU, SOLID_HU = -850.0, 40.0


def _grid_mm(shape, spacing):
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")


def _lung_with(structure: str, shape=(40, 64, 64), spacing=SPACING, radius_mm=7.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Lung with a solid ball, or a vessel (a cylinder along x), through the middle voxel."""
    z, y, x = _grid_mm(shape, spacing)
    centre = tuple(n // 2 for n in shape)
    cz, cy, cx = (c * s for c, s in zip(centre, spacing))
    if structure == "ball":
        inside = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius_mm**2
    else:
        inside = (z - cz) ** 2 + (y - cy) ** 2 <= (radius_mm / 2) ** 2
    return np.where(inside, SOLID_HU, LUNG_HU).astype(np.float32), centre  # type: ignore[return-value]


def test_a_ball_measures_round_and_a_vessel_does_not():
    hu, centre = _lung_with("ball")
    ball = ball_measure(hu, SPACING, centre)
    hu, centre = _lung_with("vessel")
    vessel = ball_measure(hu, SPACING, centre)
    assert ball.ratio > 0.7, ball
    assert vessel.ratio < 0.2, vessel
    assert ball.dot > 5 * vessel.dot
    # a 14 mm ball peaks near sigma = r / sqrt(3) = 4 mm, not at the smallest or largest width
    assert ball.scale_mm in (3.5, 4.5)


def test_the_measure_does_not_depend_on_the_storage_plane():
    """A coronal series holds the same ball with its axes swapped: same eigenvalues, same measure."""
    hu, centre = _lung_with("ball")
    axial = ball_measure(hu, SPACING, centre)
    swapped = ball_measure(np.transpose(hu, (1, 0, 2)), (SPACING[1], SPACING[0], SPACING[2]), (centre[1], centre[0], centre[2]))
    assert swapped.ratio == pytest.approx(axial.ratio, abs=1e-6)
    assert swapped.dot == pytest.approx(axial.dot, rel=1e-6)


def test_the_most_ball_like_voxel_near_the_centre_is_measured():
    """A candidate's centre a few mm off the ball still finds it; one 20 mm away does not."""
    hu, centre = _lung_with("ball")
    on = ball_measure(hu, SPACING, centre)
    near = ball_measure(hu, SPACING, (centre[0], centre[1] + 2, centre[2]))  # 3 mm off
    far = ball_measure(hu, SPACING, (centre[0], centre[1] + 14, centre[2]))  # 21 mm off, at the ball's edge
    assert near.dot == pytest.approx(on.dot, rel=0.05)
    assert far.dot < 0.5 * on.dot


def test_the_fitted_stage_keeps_balls_and_drops_vessels():
    rng = np.random.default_rng(0)
    balls = [BallMeasure(ratio=r, dot=d, scale_mm=4.5) for r, d in zip(rng.uniform(0.6, 0.95, 20), rng.uniform(80, 250, 20))]
    tubes = [BallMeasure(ratio=r, dot=d, scale_mm=2.5) for r, d in zip(rng.uniform(0.0, 0.45, 200), rng.uniform(0, 60, 200))]
    stage = fit_nodule_stage(balls + tubes, [True] * 20 + [False] * 200)
    assert min(stage.probability_of(m) for m in balls) > 0.5
    assert max(stage.probability_of(m) for m in tubes) < 0.5
    assert stage.weights[0] > 0 and stage.weights[1] > 0  # rounder and brighter balls are surer
    again = NoduleShapeStage.from_config(json.loads(json.dumps(stage.to_config())))
    assert again == stage
    with pytest.raises(ValueError, match="both true nodules and look-alikes"):
        fit_nodule_stage(tubes, [False] * len(tubes))
    with pytest.raises(ValueError, match="two weights"):
        NoduleShapeStage.from_config({"weights": [1.0], "bias": 0.0})
    assert NoduleShapeStage.from_config(None) is None


def test_in_a_cascade_the_stage_decides_nodules_in_place_of_the_verifier(tmp_path):
    """The finder's nodule is centred on a ball: kept, though the verifier says no finding; centred
    on a vessel: dropped. Without the stage the verifier has the last word again."""
    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.encoder import Med3DConfig
    from napari_tghmoe.med3d.segment import attach_finding_model
    from test_med3d import _biased_seg_model, _constant_verifier, _renal_cyst_everywhere

    organs = _biased_seg_model(tmp_path / "organs", "liver")
    # a finder that calls every voxel a lung nodule: one component, centred on the scan's middle
    finder = _renal_cyst_everywhere(tmp_path / "finder", kind="lung nodule", finding_kinds=["lung nodule"])
    config = json.loads((finder / "config.json").read_text())
    config["nodule_stage"] = NoduleShapeStage(weights=(20.0, 0.0), bias=-10.0, min_probability=0.5).to_config()
    (finder / "config.json").write_text(json.dumps(config))
    assert Med3DConfig.from_pretrained(finder).nodule_stage["min_probability"] == 0.5
    never = _constant_verifier(tmp_path / "never", finder, "none")
    cascade = attach_finding_model(organs, finder, tmp_path / "cascade", verifier_dir=never)

    hu, _ = _lung_with("ball")
    kept = segment_volume(CTVolume(hu=hu, spacing=SPACING), cascade)
    assert [f.kind for f in kept.findings] == ["lung nodule"]
    assert kept.findings[0].verifier_probability > 0.9  # the stage's probability is the second look
    hu, _ = _lung_with("vessel")
    assert segment_volume(CTVolume(hu=hu, spacing=SPACING), cascade).findings == []

    config.pop("nodule_stage")
    (finder / "config.json").write_text(json.dumps(config))
    plain = attach_finding_model(organs, finder, tmp_path / "plain", verifier_dir=never)
    hu, _ = _lung_with("ball")
    assert segment_volume(CTVolume(hu=hu, spacing=SPACING), plain).findings == []


def test_a_malformed_stage_fails_when_the_model_loads(tmp_path):
    from napari_tghmoe.med3d.encoder import Med3DConfig

    with pytest.raises(ValueError, match="two weights"):
        Med3DConfig(nodule_stage={"weights": [1.0, 2.0, 3.0], "bias": 0.0})


def test_the_stage_finds_a_ball_the_finder_missed_but_not_a_vessel():
    """propose_nodules: in the lungs, one proposal on the ball with its voxels, none on the vessel
    beside it, none where the finder already proposed something, none without proposal widths."""
    import dataclasses

    from napari_tghmoe.med3d.nodules import propose_nodules

    shape = (40, 96, 64)
    z, y, x = _grid_mm(shape, SPACING)
    ball_centre = (50.0, 40.0, 48.0)
    ball = (z - ball_centre[0]) ** 2 + (y - ball_centre[1]) ** 2 + (x - ball_centre[2]) ** 2 <= 6.0**2
    vessel = (z - 50.0) ** 2 + (y - 100.0) ** 2 <= 3.0**2  # along x, 60 mm from the ball
    hu = np.where(ball | vessel, SOLID_HU, LUNG_HU).astype(np.float32)
    lungs = np.ones(shape, bool)
    stage = NoduleShapeStage(weights=(20.0, 0.0), bias=-14.0, propose_scales_mm=(2.5, 3.5, 4.5), propose_min_probability=0.8)
    proposals = propose_nodules(hu, SPACING, lungs, stage)
    assert len(proposals) == 1
    found = proposals[0]
    assert found.probability >= 0.8 and found.measure.ratio > 0.8
    peak_mm = np.asarray(found.peak_zyx) * np.asarray(SPACING)
    assert np.linalg.norm(peak_mm - ball_centre) <= 3.0
    assert ball[tuple(found.voxels.T)].all() and len(found.voxels) >= 0.8 * ball.sum()
    assert propose_nodules(hu, SPACING, lungs, stage, exclude=ball) == []
    assert propose_nodules(hu, SPACING, np.zeros(shape, bool), stage) == []
    assert propose_nodules(hu, SPACING, lungs, dataclasses.replace(stage, propose_scales_mm=())) == []


def test_the_bundled_cascades_confirm_nodules_with_the_stage():
    """Both shipped copies of the cascade (the seg demo and the chat model's evidence encoder) carry
    the same fitted stage, and it calls a ball a nodule and a vessel not."""
    from napari_tghmoe.med3d.encoder import Med3DConfig

    root = Path(__file__).resolve().parent.parent / "resources"
    stages = [
        NoduleShapeStage.from_config(Med3DConfig.from_pretrained(folder / "findings").nodule_stage)
        for folder in (root / "demo-seg-model", root / "demo-model" / "volume_encoder")
    ]
    assert stages[0] is not None and stages[0] == stages[1]
    stage = stages[0]
    assert stage.min_probability == 0.7 and not stage.propose_scales_mm  # proposals are off (docs/results-med3d.md)
    ball, centre = _lung_with("ball")
    vessel, _ = _lung_with("vessel")
    assert stage.probability(ball, SPACING, centre) > stage.min_probability > stage.probability(vessel, SPACING, centre)


def test_the_bundled_cascades_confirm_hyperdense_liver_lesions_with_a_stage():
    """Both shipped cascades carry the same hyperdense-liver-lesion stage (bright balls in the
    liver): a 14 mm lesion at +75 HU is one, an enhancing vessel of the same density is not."""
    from napari_tghmoe.med3d.encoder import Med3DConfig

    root = Path(__file__).resolve().parent.parent / "resources"
    kind = "hyperdense liver lesion"
    stages = [
        NoduleShapeStage.from_config(Med3DConfig.from_pretrained(folder / "findings").lesion_stages.get(kind))
        for folder in (root / "demo-seg-model", root / "demo-model" / "volume_encoder")
    ]
    assert stages[0] is not None and stages[0] == stages[1]
    stage = stages[0]
    assert stage.polarity == 1 and stage.min_probability == 0.85  # chosen on validation (docs/results-med3d.md)
    ball, centre = _tissue_with("ball", tissue_hu=110.0, lesion_hu=185.0)
    vessel, _ = _tissue_with("vessel", tissue_hu=110.0, lesion_hu=185.0)
    assert stage.probability(ball, SPACING, centre) > stage.min_probability > stage.probability(vessel, SPACING, centre)


def test_a_cascade_whose_stage_proposes_adds_the_ball_the_finder_missed(tmp_path):
    """With proposal widths set, a ball in the lungs that the finder never labelled becomes a lung
    nodule with its voxels on the scan and the stage's probability; without them nothing is found."""
    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.segment import attach_finding_model
    from test_med3d import _biased_seg_model

    organs = _biased_seg_model(tmp_path / "organs", "right lower lobe")  # every voxel is lung
    blind = _biased_seg_model(  # a finder that never proposes anything
        tmp_path / "blind", "background", organ_names=[], finding_kinds=["lung nodule"], working_spacing=[4.0, 4.0, 4.0],
        finding_sites={"lung nodule": ["right lower lobe"]},
    )
    config = json.loads((blind / "config.json").read_text())
    stage = NoduleShapeStage(weights=(20.0, 0.0), bias=-14.0, min_probability=0.5, propose_scales_mm=(2.5, 3.5, 4.5))
    config["nodule_stage"] = stage.to_config()
    (blind / "config.json").write_text(json.dumps(config))
    hu, centre = _lung_with("ball")
    found = segment_volume(CTVolume(hu=hu, spacing=SPACING), attach_finding_model(organs, blind, tmp_path / "proposing"))
    assert [(f.kind, f.location) for f in found.findings] == [("lung nodule", "right lower lobe")]
    nodule = found.findings[0]
    assert nodule.verifier_probability >= stage.propose_min_probability
    assert np.linalg.norm((np.asarray(nodule.voxel_zyx) - centre) * SPACING) <= 3.0
    assert (found.labels == nodule.label).sum() == nodule.voxel_count > 0

    config["nodule_stage"] = dict(stage.to_config(), propose_scales_mm=[])
    (blind / "config.json").write_text(json.dumps(config))
    quiet = segment_volume(CTVolume(hu=hu, spacing=SPACING), attach_finding_model(organs, blind, tmp_path / "quiet"))
    assert quiet.findings == []


def _tissue_with(structure: str, tissue_hu: float, lesion_hu: float, shape=(40, 64, 64), radius_mm=7.0):
    """Solid tissue (liver, kidney) with a ball or a vessel of another density through the middle voxel."""
    hu, centre = _lung_with(structure, shape=shape, radius_mm=radius_mm)
    return np.where(hu == SOLID_HU, lesion_hu, tissue_hu).astype(np.float32), centre


def test_a_dark_ball_in_bright_tissue_is_a_ball_at_polarity_minus_one():
    """A cyst (0 HU) in an enhancing kidney (160 HU) is round on the negated HU, and no bright ball."""
    hu, centre = _tissue_with("ball", tissue_hu=160.0, lesion_hu=0.0)
    dark = ball_measure(hu, SPACING, centre, polarity=-1)
    assert dark.ratio > 0.7, dark
    assert ball_measure(hu, SPACING, centre, polarity=1).dot < 0.05 * dark.dot
    hu, centre = _tissue_with("vessel", tissue_hu=160.0, lesion_hu=0.0)
    assert ball_measure(hu, SPACING, centre, polarity=-1).ratio < 0.2
    with pytest.raises(ValueError, match="polarity"):
        ball_measure(hu, SPACING, centre, polarity=2)
    stage = NoduleShapeStage(weights=(20.0, 0.0), bias=-10.0, polarity=-1)
    assert NoduleShapeStage.from_config(json.loads(json.dumps(stage.to_config()))) == stage
    with pytest.raises(ValueError, match="polarity"):
        NoduleShapeStage.from_config({**stage.to_config(), "polarity": 0})


def test_a_lesion_stage_decides_its_kind_in_place_of_the_verifier(tmp_path):
    """``lesion_stages``: a hyperdense liver lesion candidate centred on a bright ball in the liver is
    kept though the verifier says no finding; one on a bright vessel is dropped. A stage for a kind
    the finder does not know fails when the model loads."""
    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.med3d import segment_volume
    from napari_tghmoe.med3d.encoder import Med3DConfig
    from napari_tghmoe.med3d.segment import attach_finding_model
    from test_med3d import _biased_seg_model, _constant_verifier, _renal_cyst_everywhere

    kind = "hyperdense liver lesion"
    organs = _biased_seg_model(tmp_path / "organs", "liver")
    finder = _renal_cyst_everywhere(tmp_path / "finder", kind=kind, finding_kinds=[kind])
    config = json.loads((finder / "config.json").read_text())
    config["lesion_stages"] = {kind: NoduleShapeStage(weights=(20.0, 0.0), bias=-10.0, min_probability=0.5).to_config()}
    (finder / "config.json").write_text(json.dumps(config))
    assert Med3DConfig.from_pretrained(finder).lesion_stages[kind]["min_probability"] == 0.5
    never = _constant_verifier(tmp_path / "never", finder, "none")
    cascade = attach_finding_model(organs, finder, tmp_path / "cascade", verifier_dir=never)

    hu, _ = _tissue_with("ball", tissue_hu=110.0, lesion_hu=185.0)
    kept = segment_volume(CTVolume(hu=hu, spacing=SPACING), cascade)
    assert [f.kind for f in kept.findings] == [kind]
    assert kept.findings[0].verifier_probability > 0.9
    hu, _ = _tissue_with("vessel", tissue_hu=110.0, lesion_hu=185.0)
    assert segment_volume(CTVolume(hu=hu, spacing=SPACING), cascade).findings == []

    with pytest.raises(ValueError, match="not one of finding_kinds"):
        Med3DConfig(finding_kinds=["lung nodule"], lesion_stages={kind: config["lesion_stages"][kind]})
