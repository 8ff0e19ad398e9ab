"""The CT phantom: a specification of what training, evaluation and the demo rely on."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from napari_tghmoe.io import AXIAL_DIRECTION, load_volume
from napari_tghmoe.io._geometry import orientation_name
from napari_tghmoe.phantom import (
    DEFAULT_SPACING,
    FINDING_KINDS,
    KIND_LOCATIONS,
    LABEL_ORGAN,
    PHASES,
    PLANES,
    QTYPES,
    Phantom,
    acquisition,
    default_shape,
    extract_findings,
    finding_recall_precision,
    make_phantom,
    make_phantom_dataset,
    write_dicom_series,
    write_nifti,
)

SMALL = (32, 120, 160)  # 10 mm slices, 2.25 mm pixels: whole body, fast
SEEDS = range(16)


@lru_cache(maxsize=None)
def small(seed: int, region: str, phase: str | None = None) -> Phantom:
    return make_phantom(seed, region, shape=SMALL, phase=phase)


def cases():
    return [small(seed, region) for region in ("chest", "abdomen") for seed in SEEDS]


def median_hu(p: Phantom, *label_names: str) -> float:
    mask = np.isin(p.labels, [p.label_of(n) for n in label_names])
    assert mask.sum() > 20, f"{label_names} missing from seed {p.seed} {p.region}"
    return float(np.median(p.volume.hu[mask]))


HOSTS = {
    "lung": ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe"),
    "pleura": ("right lower lobe", "left lower lobe"),
    "lymph node": ("visceral fat",),
    "liver": ("liver",),
    "kidney": ("right kidney", "left kidney"),
    "spleen": ("spleen",),
}


# ------------------------------------------------------------------ determinism & grid


def test_same_seed_gives_identical_phantom():
    a = make_phantom(7, "abdomen", shape=SMALL)
    b = make_phantom(7, "abdomen", shape=SMALL)
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.lesions, b.lesions)
    assert a.report == b.report
    assert a.vqa == b.vqa
    assert a.findings == b.findings
    assert a.volume.series_uid == b.volume.series_uid


def test_different_seeds_differ():
    a, b = make_phantom(1, "chest", shape=SMALL), make_phantom(2, "chest", shape=SMALL)
    assert not np.array_equal(a.volume.hu, b.volume.hu)
    assert a.volume.series_uid != b.volume.series_uid
    reports = {small(s, "chest").report for s in SEEDS}
    assert len(reports) > len(SEEDS) // 2


def test_the_case_does_not_depend_on_the_grid():
    coarse = make_phantom(5, "abdomen", shape=(24, 96, 128))
    fine = make_phantom(5, "abdomen", shape=(48, 200, 260))
    assert coarse.phase == fine.phase
    assert [(f.kind, f.location) for f in coarse.findings] == [(f.kind, f.location) for f in fine.findings]


def test_default_grid_is_a_clinical_scan_holding_the_whole_body():
    p = make_phantom(0, "chest")
    assert p.volume.spacing == DEFAULT_SPACING
    assert p.volume.shape == default_shape("chest")
    assert p.volume.hu.dtype == np.int16
    np.testing.assert_array_equal(p.volume.direction, AXIAL_DIRECTION)
    body = p.labels > 0
    # The body fits: nothing but air on the in-plane borders.
    assert not body[:, 0, :].any() and not body[:, -1, :].any()
    assert not body[:, :, 0].any() and not body[:, :, -1].any()
    width_mm = np.ptp(np.nonzero(body.any(axis=(0, 1)))[0]) * p.volume.spacing[2]
    assert 280 < width_mm < 360  # an adult chest


def test_shape_alone_chooses_a_spacing_that_fits_the_body():
    p = make_phantom(3, "abdomen", shape=(20, 64, 64))
    assert p.volume.shape == (20, 64, 64)
    assert p.volume.spacing[1] == p.volume.spacing[2]
    body = p.labels > 0
    assert not body[:, :, 0].any() and not body[:, :, -1].any()


def test_both_shape_and_spacing_crop_the_body():
    p = make_phantom(3, "chest", shape=(8, 100, 100), spacing=(5.0, 1.0, 1.0))
    assert p.volume.shape == (8, 100, 100) and p.volume.spacing == (5.0, 1.0, 1.0)
    assert (p.labels[:, :, 0] > 0).any()  # the 100 mm field of view cuts through the body


@pytest.mark.parametrize(
    "kwargs",
    [{"region": "head"}, {"phase": "venous"}, {"plane": "transverse"}, {"shape": (10, 10)}, {"spacing": (1.0, 0.0, 1.0)}, {"shape": (1, 64, 64)}],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        make_phantom(0, **kwargs)


def test_dataset_helper_alternates_regions():
    phantoms = make_phantom_dataset([0, 1, 2], region="both", shape=(16, 48, 64))
    assert [p.region for p in phantoms] == ["chest", "abdomen", "chest"]
    assert [p.seed for p in phantoms] == [0, 1, 2]


# --------------------------------------------------------------------- HU and anatomy


@pytest.mark.parametrize("region", ["chest", "abdomen"])
def test_hu_of_tissues_is_plausible(region):
    p = small(4, region, "non-contrast")
    outside = p.labels == p.label_of("air")
    assert np.median(p.volume.hu[outside]) < -950
    assert -130 <= median_hu(p, "subcutaneous fat") <= -70
    assert 20 <= median_hu(p, "muscle") <= 70
    assert median_hu(p, "cancellous bone", "cortical bone") > 300
    assert median_hu(p, "rib") > 300
    assert -900 <= median_hu(p, "right upper lobe" if region == "chest" else "right lower lobe") <= -750
    assert 20 <= median_hu(p, "aorta") <= 60
    if region == "abdomen":
        assert 40 <= median_hu(p, "liver") <= 80
        assert 30 <= median_hu(p, "spleen") <= 70
        assert 20 <= median_hu(p, "left kidney") <= 70
        assert median_hu(p, "bowel gas") < -800
    else:
        assert 20 <= median_hu(p, "myocardium") <= 70
        assert median_hu(p, "airway") < -800


def test_noise_is_realistic():
    p = small(4, "abdomen", "portal venous")
    liver = ndimage.binary_erosion(p.labels == p.label_of("liver"), iterations=2) & (p.lesions == 0)
    assert 5 <= float(np.std(p.volume.hu[liver])) <= 25


@pytest.mark.parametrize("region", ["chest", "abdomen"])
def test_contrast_phase_drives_enhancement(region):
    nc, art, pv, delayed = (small(9, region, phase) for phase in PHASES)
    aorta = [median_hu(p, "aorta") for p in (nc, art, pv, delayed)]
    assert aorta[0] < 70 and aorta[1] > 250 and 110 < aorta[2] < 220
    assert aorta[0] < aorta[3] < aorta[2] < aorta[1]  # delayed: washed out below portal venous
    if region == "abdomen":
        assert median_hu(nc, "liver") < median_hu(art, "liver") < median_hu(pv, "liver")
        assert median_hu(nc, "right kidney") + 80 < median_hu(art, "right kidney")
        assert median_hu(nc, "spleen") + 40 < median_hu(pv, "spleen")
        assert median_hu(nc, "liver") + 20 < median_hu(delayed, "liver") < median_hu(pv, "liver")
    # Bone and lung do not enhance.
    assert abs(median_hu(nc, "cancellous bone") - median_hu(art, "cancellous bone")) < 30


def test_lobes_and_sides_follow_the_orientation_convention():
    p = small(2, "chest")
    zz, _, xx = np.indices(p.labels.shape)
    yy = np.indices(p.labels.shape)[1]
    centre_x = p.labels.shape[2] / 2

    def mean(grid, name):
        return grid[p.labels == p.label_of(name)].mean()

    for lobe in ("right upper lobe", "right middle lobe", "right lower lobe"):
        assert mean(xx, lobe) < centre_x  # patient right = small x index
    for lobe in ("left upper lobe", "left lower lobe"):
        assert mean(xx, lobe) > centre_x
    assert mean(zz, "right upper lobe") > mean(zz, "right lower lobe")
    assert mean(zz, "left upper lobe") > mean(zz, "left lower lobe")
    assert mean(yy, "right middle lobe") < mean(yy, "right lower lobe")  # middle lobe is anterior
    assert mean(xx, "myocardium") > centre_x  # the heart points left
    a = small(2, "abdomen")
    assert (xx[a.labels == a.label_of("liver")]).mean() < centre_x
    assert (xx[a.labels == a.label_of("spleen")]).mean() > centre_x
    assert (yy[a.labels == a.label_of("cancellous bone")]).mean() > a.labels.shape[1] / 2  # spine is posterior


# ------------------------------------------------------------------------- findings


def test_findings_use_the_fixed_vocabulary():
    counts = {kind: 0 for kind in FINDING_KINDS}
    for p in cases():
        assert len(p.findings) <= 3
        organs = [f.organ for f in p.findings]
        assert len(organs) == len(set(organs))  # at most one finding per organ
        for f in p.findings:
            assert FINDING_KINDS[f.kind][0] == f.organ
            assert p.region in FINDING_KINDS[f.kind][1]
            assert f.location in KIND_LOCATIONS[f.kind]
            assert f.size_mm >= 10
            counts[f.kind] += 1
    assert all(n > 0 for n in counts.values()), counts  # every kind occurs
    assert any(not p.findings for p in cases())  # and normal cases too


def lesion_core_hu(p: Phantom, index: int) -> float:
    mask = p.lesions == index + 1
    core = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool), iterations=1)
    return float(np.mean(p.volume.hu[core if core.sum() >= 4 else mask]))


def test_each_finding_lies_in_its_organ_with_its_attenuation():
    for p in cases():
        for i, f in enumerate(p.findings):
            assert p.labels[f.center_voxel] == f.label
            assert LABEL_ORGAN[p.label_names[f.label]] == f.organ
            assert p.lesions[f.center_voxel] == i + 1
            assert abs(lesion_core_hu(p, i) - f.mean_hu) < 25, (p.seed, p.region, f)
            if f.kind == "lung nodule":
                assert p.label_names[f.label] == f.location  # the nodule sits in the named lobe


def test_findings_stand_out_from_their_organ():
    for p in cases():
        for f in p.findings:
            host = HOSTS[f.organ]
            organ = np.isin(p.labels, [p.label_of(n) for n in host]) & (p.lesions == 0)
            assert abs(f.mean_hu - np.median(p.volume.hu[organ])) >= 50, (p.seed, f)


def test_a_lesion_free_twin_differs_only_where_the_lesions_are():
    with_findings = next(p for p in cases() if len(p.findings) >= 2 and p.region == "abdomen")
    twin = make_phantom(with_findings.seed, with_findings.region, shape=SMALL, findings=False)
    assert twin.findings == [] and not twin.lesions.any()
    assert twin.phase == with_findings.phase
    changed = twin.volume.hu != with_findings.volume.hu
    near_lesion = ndimage.binary_dilation(with_findings.lesions > 0, iterations=3)  # rendering blur
    assert changed.any() and not (changed & ~near_lesion).any()
    assert "no " in twin.report.lower() or "normal" in twin.report.lower()


def test_location_words_match_the_geometry():
    for p in cases():
        nz, ny, nx = p.labels.shape
        zz = np.indices(p.labels.shape)[0]
        for f in p.findings:
            z, y, x = f.center_voxel
            if f.location.startswith("right"):
                assert x < nx / 2, f
            if f.location.startswith("left"):
                assert x > nx / 2, f
            if f.kind in ("renal cyst", "hypodense splenic lesion"):
                organ_z = zz[p.labels == f.label].mean()
                if "upper pole" in f.location:
                    assert z > organ_z, f
                if "lower pole" in f.location:
                    assert z < organ_z, f
            if f.kind == "pleural effusion":
                assert y > ny / 2  # fluid layers posteriorly in a supine patient


def test_findings_survive_resampling_to_the_model_grid():
    """What the model sees (32 x 256 x 256) still shows each finding against its organ."""
    for seed, region in ((0, "chest"), (2, "chest"), (0, "abdomen"), (6, "abdomen")):
        p = make_phantom(seed, region, shape=(64, 180, 240))
        assert p.findings
        factors = [t / s for t, s in zip((32, 256, 256), p.volume.shape)]
        hu = ndimage.zoom(p.volume.hu.astype(np.float32), factors, order=1)
        lesions = ndimage.zoom(p.lesions, factors, order=0)
        labels = ndimage.zoom(p.labels, factors, order=0)
        for i, f in enumerate(p.findings):
            inside = lesions == i + 1
            assert inside.sum() > 0, f
            host = np.isin(labels, [p.label_of(n) for n in HOSTS[f.organ]]) & (lesions == 0)
            contrast = abs(float(np.mean(hu[inside])) - float(np.median(hu[host])))
            assert contrast >= 40, (seed, region, f, contrast)


# --------------------------------------------------------------------------- report


def test_report_has_technique_findings_and_impression():
    for p in (small(0, "chest"), small(0, "abdomen")):
        assert re.search(r"TECHNIQUE:.*\n", p.report) and "FINDINGS:" in p.report and "IMPRESSION:" in p.report
        technique = p.report.split("\n")[0]
        assert p.region in technique
        assert {"non-contrast": "without intravenous contrast", "arterial": "arterial", "portal venous": "portal venous", "delayed": "delayed"}[p.phase] in technique
        assert f"{p.volume.spacing[0]:g} mm" in technique


def test_report_names_every_finding_and_no_absent_kind():
    for p in cases():
        text = p.report.lower()
        for f in p.findings:
            assert f"{round(f.size_mm)} mm {f.kind} in the {f.location}" in text
        present = {f.kind for f in p.findings}
        for kind in FINDING_KINDS:
            if kind not in present:
                assert kind not in text, (p.seed, kind)
        assert set(extract_findings(p.report)) == {(f.kind, f.location) for f in p.findings}
        # a normal phantom's report states nothing: recall and precision are 0/0, undefined
        assert finding_recall_precision(p.report, p.findings) == ((1.0, 1.0) if p.findings else (None, None))
        if not p.findings:
            impression = p.report.split("IMPRESSION:")[1]
            assert re.search(r"\b(no|normal)\b", impression.lower()) and " mm " not in impression


def test_report_scoring_detects_wrong_reports():
    p = next(p for p in cases() if p.region == "chest" and p.findings and p.findings[0].kind == "lung nodule")
    f = p.findings[0]
    wrong_lobe = next(loc for loc in KIND_LOCATIONS["lung nodule"] if loc != f.location)
    wrong = p.report.replace(f"in the {f.location}", f"in the {wrong_lobe}")
    recall, precision = finding_recall_precision(wrong, p.findings)
    assert recall < 1.0 and precision < 1.0
    assert finding_recall_precision("FINDINGS: The lungs are clear.", p.findings) == (0.0, None)  # nothing stated


# ------------------------------------------------------------------------------ VQA


def test_vqa_items_are_well_formed_and_cover_the_five_types():
    letters = []
    for p in cases():
        for q in p.vqa:
            assert len(q.choices) == 4 and len(set(q.choices)) == 4
            assert q.answer_letter in "ABCD"
            assert q.choices["ABCD".index(q.answer_letter)] == q.answer_text
            assert q.prompt.startswith(q.question + " Choices: A. ")
            assert q.target == f"{q.answer_letter}. {q.answer_text}"
            letters.append(q.answer_letter)
    assert {q.qtype for p in cases() for q in p.vqa} == set(QTYPES)
    counts = {letter: letters.count(letter) for letter in "ABCD"}
    assert min(counts.values()) > len(letters) / 8, counts  # answer position is shuffled


def _locations_in(kind: str, region: str) -> list[str]:
    from napari_tghmoe.phantom._types import ABDOMEN_NODE_STATIONS, CHEST_NODE_STATIONS

    if kind == "enlarged lymph node":
        return list(CHEST_NODE_STATIONS if region == "chest" else ABDOMEN_NODE_STATIONS)
    return list(KIND_LOCATIONS[kind])


def test_vqa_answers_agree_with_the_findings():
    for p in cases():
        by_type = {t: [q for q in p.vqa if q.qtype == t] for t in QTYPES}
        assert [q.answer_text for q in by_type["plane"]] == [p.plane]
        assert [q.answer_text for q in by_type["phase"]] == [p.phase]
        # organ and abnormality: only when one answer is right (at most one finding), and then both
        assert len(by_type["organ"]) == len(by_type["abnormality"]) <= (1 if len(p.findings) <= 1 else 0)
        for q in by_type["organ"]:
            assert q.answer_text == (p.findings[0].organ if p.findings else "none of these organs")
        for q in by_type["abnormality"]:
            assert q.answer_text == (p.findings[0].kind if p.findings else "no abnormality")
        present = {f.kind for f in p.findings}
        for f in p.findings:
            asked = [q for q in by_type["location"] if f.kind in q.question]
            real = _locations_in(f.kind, p.region)
            # a kind with fewer than three locations would need a never-right fourth option
            assert [q.answer_text for q in asked] == ([f.location] if len(real) >= 3 else [])
            for q in asked:
                assert set(q.choices) <= set(real) | {f"no {f.kind} is seen"}
        for q in by_type["location"]:
            kind = next(k for k in sorted(FINDING_KINDS, key=len, reverse=True) if k in q.question)
            if kind not in present:
                assert q.answer_text == f"no {kind} is seen"
                assert set(q.choices) <= set(_locations_in(kind, p.region)) | {q.answer_text}


def test_normal_cases_get_negative_answers():
    normal = [p for p in cases() if not p.findings]
    assert normal
    for p in normal:
        for q in p.vqa:
            if q.qtype in ("organ", "abnormality", "location"):
                assert q.answer_text in ("none of these organs", "no abnormality") or (
                    q.answer_text.startswith("no ") and q.answer_text.endswith(" is seen")
                )


# --------------------------------------------------------------- balanced choice lists

BALANCE_SEEDS = range(400)
BALANCE_GRID = (16, 48, 64)


@lru_cache(maxsize=None)
def balance_set() -> tuple[Phantom, ...]:
    """400 phantoms as the data loaders make them (plane drawn from the seed), on a small grid."""
    return tuple(
        make_phantom(seed, "chest" if seed % 2 == 0 else "abdomen", shape=BALANCE_GRID, plane=None) for seed in BALANCE_SEEDS
    )


def test_the_plane_answer_takes_every_plane_and_the_phase_every_phase():
    phantoms = balance_set()
    planes = [q.answer_text for p in phantoms for q in p.vqa if q.qtype == "plane"]
    phases = [q.answer_text for p in phantoms for q in p.vqa if q.qtype == "phase"]
    for values, vocabulary in ((planes, PLANES), (phases, PHASES)):
        counts = {v: values.count(v) for v in vocabulary}
        assert set(values) == set(vocabulary) and min(counts.values()) > len(values) / 6, counts
    # every option of a plane or phase question is a value phantoms really take
    assert {c for p in phantoms for q in p.vqa if q.qtype == "plane" for c in q.choices} == set(PLANES)
    assert {c for p in phantoms for q in p.vqa if q.qtype == "phase" for c in q.choices} == set(PHASES)


def test_every_choice_text_that_is_shown_is_sometimes_right_about_a_quarter_of_the_time():
    shown: dict[tuple[str, str], int] = {}
    right: dict[tuple[str, str], int] = {}
    for p in balance_set():
        for q in p.vqa:
            for choice in q.choices:
                shown[q.qtype, choice] = shown.get((q.qtype, choice), 0) + 1
                right[q.qtype, choice] = right.get((q.qtype, choice), 0) + (choice == q.answer_text)
    never = [key for key in shown if right.get(key, 0) == 0]
    assert not never, f"options shown but never right: {never}"
    # per type, the options' hit rates pooled: a quarter, as for a fair four-choice question
    for qtype in QTYPES:
        total_shown = sum(n for (t, _), n in shown.items() if t == qtype)
        total_right = sum(n for (t, _), n in right.items() if t == qtype)
        assert total_right / total_shown == pytest.approx(0.25)
    frequent = {key: right.get(key, 0) / n for key, n in shown.items() if n >= 100}
    assert frequent and all(0.15 <= rate <= 0.37 for rate in frequent.values()), frequent


def test_the_plane_is_stored_in_the_slice_order_with_its_geometry():
    axial = make_phantom(3, "abdomen", shape=(12, 40, 48), plane="axial")
    assert axial.plane == "axial" and np.allclose(axial.volume.direction, AXIAL_DIRECTION)
    for plane in ("coronal", "sagittal", "oblique"):
        p = make_phantom(3, "abdomen", shape=(12, 40, 48), plane=plane)
        v = p.volume
        assert p.plane == plane and orientation_name(v.direction) == plane
        assert p.labels.shape == p.lesions.shape == v.shape
        assert np.allclose(v.direction.T @ v.direction, np.eye(3))  # orthonormal
        assert [q.answer_text for q in p.vqa if q.qtype == "plane"] == [plane]
        assert plane in p.report.split("\n")[0].lower()
        # the same patient: each finding's centre lies at the same place in mm (within a voxel)
        assert [f.kind for f in p.findings] == [f.kind for f in axial.findings]
        for f, g in zip(p.findings, axial.findings):
            assert p.lesions[f.center_voxel] == p.findings.index(f) + 1
            here, there = v.index_to_patient(f.center_voxel), axial.volume.index_to_patient(g.center_voxel)
            assert np.linalg.norm(here - there) <= np.linalg.norm(axial.volume.spacing) + 1e-6
        if plane != "oblique":  # orthogonal planes: the same voxels, reordered
            assert sorted(v.shape) == sorted(axial.volume.shape)
            assert np.array_equal(np.sort(p.labels, axis=None), np.sort(axial.labels, axis=None))
    coronal = make_phantom(3, "abdomen", shape=(12, 40, 48), plane="coronal")
    # coronal: slices run front to back, rows head to feet, columns right to left
    np.testing.assert_array_equal(coronal.labels, np.transpose(axial.labels, (1, 0, 2))[:, ::-1, :])


def test_the_acquisition_draw_is_deterministic_and_leaves_the_patient_alone():
    assert [acquisition(s) for s in range(20)] == [acquisition(s) for s in range(20)]
    a = make_phantom(6, "chest", shape=(12, 40, 48), plane=None)
    b = make_phantom(6, "chest", shape=(12, 40, 48), plane=None)
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    assert a.vqa == b.vqa and a.plane == acquisition(6)["plane"]
    # the anatomy and findings do not depend on the plane
    c = make_phantom(6, "chest", shape=(12, 40, 48), plane="axial", phase=a.phase)
    assert [(f.kind, f.location) for f in a.findings] == [(f.kind, f.location) for f in c.findings]


# ---------------------------------------------------------------------------- files


def test_phantom_round_trips_through_nifti_and_dicom(tmp_path):
    p = make_phantom(11, "chest", shape=(12, 64, 80))
    nifti = write_nifti(p.volume, tmp_path / "phantom.nii.gz")
    back = load_volume(nifti)
    np.testing.assert_array_equal(back.hu, p.volume.hu)
    np.testing.assert_allclose(back.spacing, p.volume.spacing, atol=1e-4)
    write_dicom_series(p.volume, tmp_path / "dicom", shuffle_names=True)
    back = load_volume(tmp_path / "dicom")
    np.testing.assert_array_equal(back.hu, p.volume.hu)
    np.testing.assert_allclose(back.spacing, p.volume.spacing, atol=1e-3)
    np.testing.assert_allclose(back.direction, p.volume.direction, atol=1e-6)
