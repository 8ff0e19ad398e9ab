"""Specification of napari_tghmoe.io: CT input from DICOM, NIfTI, MetaImage and NRRD.

Volumes are small synthetic arrays built with numpy (no phantom dependency) plus the
real CT files that ship with pydicom and pydicom-data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from napari_tghmoe.io import (
    AXIAL_DIRECTION,
    CTVolume,
    SeriesInfo,
    VolumeReadError,
    list_series,
    load_volume,
    write_dicom_series,
    write_nifti,
    write_volume,
)

SHAPE = (12, 32, 40)
SPACING = (2.5, 0.7, 0.8)
ORIGIN = (-14.0, -11.2, 30.0)
#: A coronal acquisition (columns k, j, i): slices along P, rows down (towards -S), columns to L.
CORONAL = np.stack([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], axis=1)
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def make_volume(shape=SHAPE, spacing=SPACING, origin=ORIGIN, direction=AXIAL_DIRECTION, seed=0, **kw) -> CTVolume:
    """A CT-like volume whose every voxel is distinct enough to catch a misplaced slice."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    hu[:, 0, 0] = np.arange(shape[0]) * 10  # slice index readable in a corner
    return CTVolume(hu=hu, spacing=spacing, origin=origin, direction=direction, **kw)


def edit(path: Path, **attributes) -> None:
    """Change attributes of one written DICOM file in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def by_position(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def all_text(volume: CTVolume) -> str:
    """Everything in a CTVolume except the voxels, as one string (to look for leaks)."""
    fields = {k: v for k, v in vars(volume).items() if k != "hu"}
    return json.dumps(fields, default=str) + repr(volume.summary())


# --------------------------------------------------------------------------- DICOM basics


def test_shuffled_nested_series_loads_in_position_order(tmp_path):
    volume = make_volume()
    written = write_dicom_series(volume, tmp_path / "flat", shuffle_names=True)
    # Scatter the files into nested folders with names unrelated to slice order.
    for index, path in enumerate(written):
        target = tmp_path / "study" / f"sub{index % 3}" / ("deep" if index % 2 else "") / f"x{index * 7919 % 101}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    assert not any(p.suffix == ".dcm" for p in (tmp_path / "study").rglob("*") if p.is_file())

    loaded = load_volume(tmp_path / "study")

    np.testing.assert_array_equal(loaded.hu, volume.hu)
    assert loaded.hu.dtype == np.int16
    np.testing.assert_allclose(loaded.spacing, SPACING)
    np.testing.assert_allclose(loaded.origin, ORIGIN)
    np.testing.assert_allclose(loaded.direction, AXIAL_DIRECTION)
    assert loaded.metadata["source_format"] == "DICOM"
    assert loaded.warnings == []


def test_order_and_spacing_come_from_positions_not_instance_number_or_thickness(tmp_path):
    volume = make_volume()
    paths = write_dicom_series(volume, tmp_path)
    for k, path in enumerate(paths):  # InstanceNumber reversed, SliceThickness wrong
        edit(path, InstanceNumber=len(paths) - k, SliceThickness="7.0", SliceLocation="0")
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    assert loaded.spacing[0] == pytest.approx(2.5)


def test_pydicom_ct5n_loads_five_slices_in_position_order_2_5_mm_apart():
    loaded = load_volume(CT5N)
    files = sorted(CT5N.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    assert loaded.shape == (5, 16, 16)
    assert loaded.spacing[0] == pytest.approx(2.5)
    z = [loaded.index_to_patient((k, 0, 0))[2] for k in range(5)]
    assert np.all(np.diff(z) == pytest.approx(2.5))
    for k, path in enumerate(files):  # slice k is the k-th file by position, in HU
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(loaded.hu[k], expected)
        assert z[k] == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert loaded.description == "SmartScore - Gated 0.5 sec"


# --------------------------------------------------------------------------- HU


def test_signed_storage_with_intercept_gives_exact_int16_hu(tmp_path):
    volume = make_volume()
    write_dicom_series(volume, tmp_path, rescale_intercept=-1024)
    loaded = load_volume(tmp_path)
    assert loaded.hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.hu, volume.hu)


def test_uint16_with_negative_intercept_does_not_wrap_around(tmp_path):
    volume = make_volume()
    volume.hu[3, 5, 5] = -1024  # stored 0: the classic unsigned underflow spot
    write_dicom_series(volume, tmp_path, unsigned=True, rescale_intercept=-1024)
    assert pydicom.dcmread(next(tmp_path.iterdir())).PixelRepresentation == 0
    loaded = load_volume(tmp_path)
    assert loaded.hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    assert loaded.hu.min() == -1024


def test_uint16_values_beyond_int16_become_float32_not_garbage(tmp_path):
    volume = make_volume()
    hu = volume.hu.astype(np.float32)
    hu[2, 3, 4] = 60000.0  # metal artefact beyond int16 once the intercept is applied
    volume = CTVolume(hu=hu, spacing=SPACING, origin=ORIGIN)
    write_dicom_series(volume, tmp_path, unsigned=True, rescale_intercept=-1024)
    loaded = load_volume(tmp_path)
    assert loaded.hu.dtype == np.float32
    np.testing.assert_array_equal(loaded.hu, hu)


def test_fractional_slope_gives_float32_hu(tmp_path):
    volume = make_volume()
    paths = write_dicom_series(volume, tmp_path, rescale_intercept=0)
    for path in paths:
        edit(path, RescaleSlope="0.5", RescaleIntercept="-10")
    loaded = load_volume(tmp_path)
    assert loaded.hu.dtype == np.float32
    np.testing.assert_allclose(loaded.hu, volume.hu * 0.5 - 10)


# --------------------------------------------------------------------------- metadata


def test_metadata_is_an_allow_list_and_identifiers_never_leak(tmp_path):
    secrets = {
        "PatientName": "Doe^Jane",
        "PatientID": "MRN-123456",
        "AccessionNumber": "ACC-998877",
        "InstitutionName": "St Example Hospital",
        "PatientBirthDate": "19510203",
        "ReferringPhysicianName": "House^Gregory",
        "OtherPatientIDs": "OTHER-42",
    }
    facts = {
        "BodyPartExamined": "CHEST",
        "KVP": "120",
        "ConvolutionKernel": "B30f",
        "ContrastBolusAgent": "Iohexol",
        "ManufacturerModelName": "Somatom Test",
    }
    volume = make_volume(window=(40.0, 400.0))
    write_dicom_series(
        volume, tmp_path / "scan", series_description="Thorax 2.5 mm", extra_attributes={**secrets, **facts}
    )
    loaded = load_volume(tmp_path / "scan")
    text = all_text(loaded)
    for value in ["Doe", "Jane", "123456", "998877", "Example Hospital", "19510203", "House", "OTHER-42"]:
        assert value not in text
    assert loaded.metadata["body_part"] == "CHEST"
    assert loaded.metadata["kvp"] == 120.0
    assert loaded.metadata["convolution_kernel"] == "B30f"
    assert loaded.metadata["contrast_agent"] == "Iohexol"
    assert loaded.metadata["manufacturer_model"] == "Somatom Test"
    assert loaded.metadata["slice_thickness_mm"] == pytest.approx(2.5)
    assert loaded.metadata["series_description"] == loaded.description == "Thorax 2.5 mm"
    assert loaded.window == (40.0, 400.0)
    for uid in (loaded.study_uid, loaded.series_uid, loaded.frame_of_reference_uid):
        assert uid and all(part.isdigit() for part in uid.split("."))


# --------------------------------------------------------------------------- several series


def _folder_with_distractors(tmp_path: Path) -> tuple[CTVolume, dict[str, str]]:
    """Main axial CT + a smaller axial series + a coronal reformat + a localizer + an SR."""
    main = make_volume()
    uids = {name: generate_uid() for name in ("main", "small", "coronal", "scout")}
    write_dicom_series(main, tmp_path / "a", shuffle_names=True, series_uid=uids["main"], series_description="Main")
    small = make_volume(shape=(6, 32, 40), seed=1)
    write_dicom_series(small, tmp_path / "b", series_uid=uids["small"], series_description="Small", name_prefix="s")
    coronal = make_volume(shape=(20, 12, 40), spacing=(1.0, 2.5, 0.8), seed=2, direction=CORONAL)
    write_dicom_series(coronal, tmp_path / "c", series_uid=uids["coronal"], series_description="Coronal MPR",
                       image_type=("DERIVED", "SECONDARY", "REFORMATTED"))
    scout = CTVolume(hu=np.zeros((1, 64, 40), np.int16), direction=CORONAL)
    write_dicom_series(scout, tmp_path / "d", series_uid=uids["scout"], series_description="Topogram",
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _write_non_image(tmp_path / "e" / "report", "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    return main, uids


def test_several_series_load_the_largest_axial_ct_and_name_the_others(tmp_path):
    main, uids = _folder_with_distractors(tmp_path)
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, main.hu)
    assert loaded.series_uid == uids["main"]
    joined = "\n".join(loaded.warnings)
    for name in ("Small", "Coronal MPR", "Topogram", "report"):
        assert name in joined


def test_list_series_describes_each_series_and_series_uid_selects_one(tmp_path):
    _, uids = _folder_with_distractors(tmp_path)
    infos = list_series(tmp_path)
    assert all(isinstance(info, SeriesInfo) for info in infos)
    by_uid = {info.uid: info for info in infos}
    assert set(by_uid) == set(uids.values())
    assert infos[0].uid == uids["main"]  # default choice first
    assert by_uid[uids["main"]].shape == SHAPE
    assert by_uid[uids["main"]].spacing == pytest.approx(SPACING)
    assert by_uid[uids["small"]].slice_count == 6
    assert by_uid[uids["coronal"]].orientation == "coronal"
    assert by_uid[uids["scout"]].orientation == "localizer"
    assert by_uid[uids["main"]].description == "Main"

    small = load_volume(tmp_path, series_uid=uids["small"])
    np.testing.assert_array_equal(small.hu, make_volume(shape=(6, 32, 40), seed=1).hu)


def test_localizer_and_other_size_inside_the_series_are_dropped_with_a_warning(tmp_path):
    volume = make_volume()
    uid = generate_uid()
    write_dicom_series(volume, tmp_path, series_uid=uid)
    scout = CTVolume(hu=np.zeros((1, 64, 40), np.int16), direction=CORONAL)
    write_dicom_series(scout, tmp_path, series_uid=uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), name_prefix="scout")
    odd = CTVolume(hu=np.zeros((1, 16, 16), np.int16), origin=(0, 0, 500))
    write_dicom_series(odd, tmp_path, series_uid=uid, name_prefix="odd")
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    joined = "\n".join(loaded.warnings)
    assert "localizer" in joined and "16x16" in joined


# --------------------------------------------------------------------------- same scan, every format


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr"])
def test_dicom_and_volume_files_give_the_same_array_spacing_and_direction(tmp_path, suffix):
    volume = make_volume()
    write_dicom_series(volume, tmp_path / "dicom", shuffle_names=True)
    from_dicom = load_volume(tmp_path / "dicom")
    from_file = load_volume(write_volume(volume, tmp_path / f"scan{suffix}"))
    np.testing.assert_array_equal(from_file.hu, from_dicom.hu)
    np.testing.assert_allclose(from_file.spacing, from_dicom.spacing, rtol=1e-6)
    np.testing.assert_allclose(from_file.origin, from_dicom.origin, atol=1e-4)
    np.testing.assert_allclose(from_file.direction, from_dicom.direction, atol=1e-6)
    assert from_file.hu.dtype == np.int16


def test_write_nifti_round_trips_and_adds_the_suffix(tmp_path):
    volume = make_volume()
    path = write_nifti(volume, tmp_path / "scan")
    assert path.name == "scan.nii.gz"
    loaded = load_volume(path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    assert loaded.metadata["source_format"] == "NIfTI"


def test_non_lps_orientations_are_reoriented_identically_from_dicom_and_nifti(tmp_path):
    volume = make_volume(shape=(10, 14, 18), spacing=(1.5, 2.0, 0.9), direction=CORONAL)
    write_dicom_series(volume, tmp_path / "dicom", shuffle_names=True)
    from_dicom = load_volume(tmp_path / "dicom")
    from_nifti = load_volume(write_nifti(volume, tmp_path / "coronal.nii.gz"))

    expected = np.flip(volume.hu, axis=1).transpose(1, 0, 2)  # (S, P, L) order
    for loaded in (from_dicom, from_nifti):
        np.testing.assert_array_equal(loaded.hu, expected)
        np.testing.assert_allclose(loaded.direction, AXIAL_DIRECTION, atol=1e-6)
        np.testing.assert_allclose(loaded.spacing, (2.0, 1.5, 0.9), rtol=1e-6)
        # The same physical voxel sits at the same patient position.
        k, j, i = 3, 4, 5
        np.testing.assert_allclose(
            loaded.index_to_patient((k, j, i)), volume.index_to_patient((j, 13 - k, i)), atol=1e-4
        )


def test_written_series_is_valid_ct_readable_by_simpleitk(tmp_path):
    import SimpleITK as sitk

    volume = make_volume(window=(-600.0, 1500.0))
    paths = write_dicom_series(volume, tmp_path, shuffle_names=True)
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert float(ds.RescaleIntercept) == -1024 and float(ds.SliceThickness) == 2.5
    assert float(ds.WindowCenter) == -600 and float(ds.WindowWidth) == 1500
    assert ds.PatientName == "Phantom^Anonymous"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.hu)
    np.testing.assert_allclose(image.GetSpacing(), SPACING[::-1], rtol=1e-6)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_series_decode(tmp_path, syntax):
    volume = make_volume(shape=(5, 32, 40))
    write_dicom_series(volume, tmp_path, transfer_syntax=getattr(pydicom.uid, syntax), shuffle_names=True)
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID.is_compressed
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)


# --------------------------------------------------------------------------- real CT from pydicom-data


def test_real_single_ct_slice_needs_allow_2d_and_has_plausible_hu():
    path = Path(pydicom.data.get_testdata_file("explicit_VR-UN.dcm"))  # JPEG 2000 abdomen slice
    with pytest.raises(VolumeReadError, match="2D") as caught:
        load_volume(path)
    assert caught.value.path == str(path)
    loaded = load_volume(path, allow_2d=True)
    assert loaded.shape == (1, 512, 512)
    assert -1100 <= loaded.hu.min() <= -900  # air outside the patient
    assert 300 <= loaded.hu.max() <= 3000  # bone
    soft = np.median(loaded.hu[0, 200:300, 200:300])
    assert -200 < soft < 200  # abdomen soft tissue


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "CT_small.dcm"])
def test_other_real_ct_slices_have_plausible_hu(name):
    loaded = load_volume(pydicom.data.get_testdata_file(name), allow_2d=True)
    assert loaded.hu.min() >= -3100 and loaded.hu.max() <= 4000
    assert np.percentile(loaded.hu, 5) < -500 < 0 < np.percentile(loaded.hu, 95)


def test_enhanced_multiframe_ct_uses_per_frame_positions():
    path = pydicom.data.get_testdata_file("eCT_Supplemental.dcm")
    loaded = load_volume(path)
    ds = pydicom.dcmread(path)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert loaded.shape == (2, 512, 512)
    assert loaded.spacing[0] == pytest.approx(abs(z[1] - z[0]))
    assert loaded.metadata["source_format"] == "DICOM (multi-frame)"
    # Rows run to the patient's right in the file: reoriented so columns run to the left.
    np.testing.assert_allclose(loaded.direction, AXIAL_DIRECTION, atol=1e-6)
    frames = ds.pixel_array  # frame 0 at z=-159 is the lower one: slice 0 after sorting
    lower = int(np.argmin(z))
    np.testing.assert_array_equal(loaded.hu[0], frames[lower][:, ::-1].astype(np.int32) - 1024)
    assert loaded.window is not None


def _shipped_files(package: str) -> list[Path]:
    """Every file pydicom ships for its tests (``test_files``, ``charset_files``) or pydicom-data
    holds (``data_store/data``): DICOM of every kind, damaged ones, and files that are no DICOM."""
    if package == "pydicom":
        folders = [Path(pydicom.__file__).parent / "data" / name for name in ("test_files", "charset_files")]
    else:
        data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
        folders = [Path(data_store.__file__).parent / "data"]
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


def _reference_text(value) -> list[str] | None:
    """pydicom's value as the components the header code reads from the raw text."""
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else str(value).split("\\")
    return [str(item).strip() for item in items]


def _reference_numbers(value) -> list[float] | None:
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return [float(item) for item in items] or None


def _same_numbers(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x == y or (np.isnan(x) and np.isnan(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("package", ["pydicom", "pydicom-data"])
def test_the_fast_header_path_agrees_with_pydicom_on_every_file_it_ships(package, monkeypatch):
    """The header pass decodes the raw bytes of pydicom's unconverted elements itself (pydicom
    internals). On every file shipped with pydicom and pydicom-data, each value it reads must be the
    one ``pydicom.dcmread`` gives; where pydicom cannot convert a value, the fast path declines it
    (None, or the caller's default), never a made-up number; a file is either read into frames or
    skipped with a reason, never a crash; and a pixel-data offset it records points at exactly the
    bytes pydicom reads as PixelData (or the file really is truncated)."""
    import warnings

    from napari_tghmoe.io._dicom import header

    calls: list[tuple[str, int, object]] = []

    class Recording(header._Fast):
        __slots__ = ()

        def text(self, tag):
            result = super().text(tag)
            calls.append(("text", tag, result))
            return result

        def numbers(self, tag):
            result = super().numbers(tag)
            calls.append(("numbers", tag, result))
            return result

        def binary(self, tag, default):
            result = super().binary(tag, default)
            calls.append(("binary", tag, (result, default)))
            return result

    monkeypatch.setattr(header, "_Fast", Recording)
    files = _shipped_files(package)
    assert len(files) > (150 if package == "pydicom" else 50)
    problems: list[str] = []
    counts = {"frames": 0, "skipped": 0, "values": 0, "offsets": 0}
    for path in files:
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = header.read_frames(str(path))
            except Exception as exc:  # noqa: BLE001 - the point: nothing may escape
                problems.append(f"{path.name}: read_frames raised {type(exc).__name__}: {exc}")
                continue
            try:
                reference = pydicom.dcmread(path, force=True)
            except Exception:  # noqa: BLE001 - pydicom cannot read it: it must not become frames
                reference = None
        if isinstance(result, header._Skipped):
            counts["skipped"] += 1
            if not result.reason or result.kind not in {
                "empty", "not-dicom", "dicomdir", "non-image", "colour", "broken", "special", "unreadable"
            }:
                problems.append(f"{path.name}: skipped without a clear reason ({result.kind!r}, {result.reason!r})")
        else:
            counts["frames"] += 1
            if reference is None:
                problems.append(f"{path.name}: frames from a file pydicom cannot read")
                continue
        for method, tag, got in calls:
            counts["values"] += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    value = reference[tag].value if tag in reference else None
                    failed = None
                except Exception as exc:  # noqa: BLE001 - pydicom cannot convert this value
                    value, failed = None, exc
            where = f"{path.name} ({package}) tag {tag:08X}"
            if method == "text":
                read = [v.strip() for v in got.split("\\")] if got else None
                if failed is None and read != _reference_text(value):
                    problems.append(f"{where}: fast text {got!r}, pydicom {value!r}")
            elif method == "numbers":
                try:
                    expected = None if failed else _reference_numbers(value)
                except (TypeError, ValueError):
                    expected, failed = None, True
                if failed and got is not None:
                    problems.append(f"{where}: fast path read {got} where pydicom cannot convert {value!r}")
                elif not failed and not _same_numbers(got, expected):
                    problems.append(f"{where}: fast numbers {got}, pydicom {value!r}")
            else:
                result_value, default = got
                if failed is None:
                    expected = default if value is None else int(value[0] if isinstance(value, (list, tuple)) else value)
                    if result_value != expected:
                        problems.append(f"{where}: fast binary {result_value}, pydicom {value!r}")
        if reference is not None and not isinstance(result, header._Skipped):
            for frame in result:
                if frame.pixel_offset is None:
                    continue
                counts["offsets"] += 1
                with open(path, "rb") as handle:
                    handle.seek(frame.pixel_offset)
                    stored = handle.read(frame.pixel_length)
                if frame.truncated:
                    if len(reference.PixelData) >= frame.pixel_length:
                        problems.append(f"{path.name}: called truncated but pydicom reads all {frame.pixel_length} bytes")
                elif stored != reference.PixelData:
                    problems.append(f"{path.name}: bytes at the recorded pixel offset are not pydicom's PixelData")
    assert problems == []
    # The sweep really exercised both outcomes and the raw-bytes reading.
    assert counts["frames"] > 10 and counts["skipped"] > 5 and counts["values"] > 1000 and counts["offsets"] > 10


def test_a_deflated_file_decodes_through_pydicom_not_from_file_offsets():
    """Deflated Explicit VR: offsets point into the inflated stream, so the file is decoded by
    pydicom (it was once refused as "truncated")."""
    path = pydicom.data.get_testdata_file("image_dfl.dcm")
    reference = pydicom.dcmread(path)
    assert reference.file_meta.TransferSyntaxUID.is_deflated
    loaded = load_volume(path, allow_2d=True)
    np.testing.assert_array_equal(loaded.hu[0], reference.pixel_array)


# --------------------------------------------------------------------------- irregular geometry


def test_missing_slice_is_reported_and_resampled_to_a_uniform_grid(tmp_path):
    volume = make_volume()
    paths = write_dicom_series(volume, tmp_path)
    paths[5].unlink()
    loaded = load_volume(tmp_path)
    assert loaded.shape == SHAPE  # gap filled back to 12 slices
    assert loaded.spacing[0] == pytest.approx(2.5)
    assert any("1 missing slice" in w and "resampled" in w for w in loaded.warnings)
    np.testing.assert_array_equal(loaded.hu[4], volume.hu[4])
    np.testing.assert_array_equal(loaded.hu[6], volume.hu[6])
    expected = np.rint((volume.hu[4].astype(np.float32) + volume.hu[6]) / 2)
    np.testing.assert_array_equal(loaded.hu[5], expected)

    kept = load_volume(tmp_path, resample=False)
    assert kept.shape[0] == 11 and any("NOT resampled" in w for w in kept.warnings)


def test_non_uniform_spacing_is_reported(tmp_path):
    volume = make_volume()
    paths = write_dicom_series(volume, tmp_path)
    for k, path in enumerate(paths):
        z = ORIGIN[2] + 2.5 * k + (0.9 if k >= 6 else 0.0)
        edit(path, ImagePositionPatient=[ORIGIN[0], ORIGIN[1], z])
    loaded = load_volume(tmp_path)
    assert any("non-uniform slice spacing" in w for w in loaded.warnings)
    np.testing.assert_allclose(np.diff([loaded.index_to_patient((k, 0, 0))[2] for k in range(loaded.shape[0])]),
                               loaded.spacing[0])


def test_gantry_tilt_is_reported(tmp_path):
    volume = make_volume()
    paths = write_dicom_series(volume, tmp_path)
    for k, path in enumerate(paths):
        edit(path, ImagePositionPatient=[ORIGIN[0], ORIGIN[1] + 0.5 * k, ORIGIN[2] + 2.5 * k])
    loaded = load_volume(tmp_path)
    assert any("tilt" in w for w in loaded.warnings)
    np.testing.assert_array_equal(loaded.hu, volume.hu)


def test_4d_dicom_series_loads_the_first_volume_with_a_warning(tmp_path):
    first, second = make_volume(seed=1), make_volume(seed=2)
    uid = generate_uid()
    for index, volume in enumerate((first, second)):
        paths = write_dicom_series(volume, tmp_path, series_uid=uid, name_prefix=f"t{index}")
        for path in paths:
            edit(path, TemporalPositionIdentifier=index + 1)
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, first.hu)
    assert any("4D" in w for w in loaded.warnings)


def test_4d_nifti_loads_the_first_volume_with_a_warning(tmp_path):
    import SimpleITK as sitk

    data = np.stack([make_volume(seed=1).hu, make_volume(seed=2).hu])  # (t, z, y, x)
    image = sitk.GetImageFromArray(data, isVector=False)
    image.SetSpacing((0.8, 0.7, 2.5, 1.0))
    path = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(image, str(path))
    loaded = load_volume(path)
    np.testing.assert_array_equal(loaded.hu, data[0])
    assert loaded.spacing == pytest.approx(SPACING)
    assert any("4D" in w for w in loaded.warnings)


def test_list_series_of_a_volume_file(tmp_path):
    path = write_nifti(make_volume(), tmp_path / "scan.nii.gz")
    [info] = list_series(path)
    assert info.shape == SHAPE and info.slice_count == 12


# --------------------------------------------------------------------------- bad inputs


def _write_non_image(path: Path, sop_class: str, **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR" if "88" in sop_class else "RTSTRUCT"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _rgb_secondary_capture(path: Path) -> Path:
    path = _write_non_image(path, "1.2.840.10008.5.1.4.1.1.7", Rows=8, Columns=8, SamplesPerPixel=3,
                            PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8,
                            BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(8 * 8 * 3)
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _single_slice(tmp_path: Path) -> Path:
    return write_dicom_series(make_volume(shape=(1, 32, 40)), tmp_path / "one")[0]


def _truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])
    return path


def bad_nonexistent(tmp_path):
    return tmp_path / "missing", tmp_path / "missing"


def bad_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", tmp_path / "empty"


def bad_folder_of_text_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not an image")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    return folder, folder


def bad_zero_byte_file(tmp_path):
    (tmp_path / "IM0001").write_bytes(b"")
    return tmp_path / "IM0001", tmp_path / "IM0001"


def bad_zero_byte_nifti(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    return tmp_path / "scan.nii.gz", tmp_path / "scan.nii.gz"


def bad_random_bytes(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    return path, path


def bad_truncated_slice_in_series(tmp_path):
    paths = write_dicom_series(make_volume(), tmp_path / "series", shuffle_names=True)
    _truncate(paths[4], 1000)
    return tmp_path / "series", paths[4]


def bad_truncated_single_file(tmp_path):
    path = tmp_path / "enhanced_ct"  # a real enhanced CT, cut short
    shutil.copy(pydicom.data.get_testdata_file("eCT_Supplemental.dcm"), path)
    return _truncate(path, 5000), path


def bad_truncated_nifti_gz(tmp_path):
    path = write_nifti(make_volume(), tmp_path / "scan.nii.gz")
    return _truncate(path, path.stat().st_size // 2), path


def bad_truncated_nii(tmp_path):
    path = write_volume(make_volume(), tmp_path / "scan.nii")
    return _truncate(path, 5000), path


def bad_structured_report(tmp_path):
    path = _write_non_image(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.11")
    return path, path


def bad_rt_struct(tmp_path):
    path = _write_non_image(tmp_path / "rtss", "1.2.840.10008.5.1.4.1.1.481.3")
    return path, path


def bad_folder_of_non_images(tmp_path):
    _write_non_image(tmp_path / "f" / "sr", "1.2.840.10008.5.1.4.1.1.88.11")
    _write_non_image(tmp_path / "f" / "rt", "1.2.840.10008.5.1.4.1.1.481.3")
    return tmp_path / "f", tmp_path / "f"


def bad_rgb_secondary_capture(tmp_path):
    path = _rgb_secondary_capture(tmp_path / "sc.dcm")
    return path, path


def bad_single_2d_slice(tmp_path):
    path = _single_slice(tmp_path)
    return path, path


def bad_folder_with_one_slice(tmp_path):
    _single_slice(tmp_path)
    return tmp_path / "one", tmp_path / "one"


def bad_2d_metaimage(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 40), np.int16)), str(path))
    return path, path


def bad_inconsistent_slice_sizes(tmp_path):
    uid = generate_uid()
    write_dicom_series(make_volume(shape=(4, 32, 40)), tmp_path / "mixed", series_uid=uid, name_prefix="a")
    write_dicom_series(make_volume(shape=(4, 16, 20), origin=(0, 0, 100)), tmp_path / "mixed", series_uid=uid,
                       name_prefix="b")
    return tmp_path / "mixed", tmp_path / "mixed"


def bad_nan_voxels(tmp_path):
    hu = make_volume().hu.astype(np.float32)
    hu[3, 4, 5] = np.nan
    path = write_volume(CTVolume(hu=hu), tmp_path / "nan.nii.gz")
    return path, path


def bad_inf_voxels(tmp_path):
    hu = make_volume().hu.astype(np.float32)
    hu[7, 1, 2] = np.inf
    path = write_volume(CTVolume(hu=hu), tmp_path / "inf.mha")
    return path, path


def bad_absurd_nifti_header(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((32000, 32000, 32000))  # NIfTI-1 dims are int16
    path = tmp_path / "huge.nii"
    with open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    return path, path


def bad_absurd_nrrd_header(tmp_path):
    path = tmp_path / "huge.nhdr"
    path.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        "sizes: 100000 100000 100000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        "encoding: raw\nendian: little\ndata file: huge.raw\n\n"
    )
    (tmp_path / "huge.raw").write_bytes(b"\x00" * 64)
    return path, path


def bad_absurd_dicom_frames(tmp_path):
    path = write_dicom_series(make_volume(shape=(1, 32, 40)), tmp_path / "mf")[0]
    edit(path, NumberOfFrames=100000, Rows=60000, Columns=60000)
    return path, path


def bad_rgb_nifti(tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    path = tmp_path / "colour.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, path


def bad_duplicate_positions(tmp_path):
    uid = generate_uid()
    volume = make_volume(shape=(3, 32, 40))
    write_dicom_series(volume, tmp_path / "dup", series_uid=uid, name_prefix="a")
    write_dicom_series(make_volume(shape=(3, 32, 40), seed=5), tmp_path / "dup", series_uid=uid, name_prefix="b")
    return tmp_path / "dup", tmp_path / "dup"


def bad_mhd_without_data(tmp_path):
    path = write_volume(make_volume(), tmp_path / "scan.mhd")
    (tmp_path / "scan.zraw").unlink(missing_ok=True)
    (tmp_path / "scan.raw").unlink(missing_ok=True)
    return path, path


def bad_unknown_format(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    return path, path


def bad_nan_rescale_slope(tmp_path):
    paths = write_dicom_series(make_volume(shape=(3, 32, 40)), tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds["RescaleSlope"].value = "nan"
        ds.save_as(path)
    return tmp_path / "s", paths[0]


def bad_unknown_series_uid(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "s")
    return tmp_path / "s", tmp_path / "s"


BAD_INPUTS = [
    (bad_nonexistent, "no such file"),
    (bad_empty_folder, "empty folder"),
    (bad_folder_of_text_files, "no DICOM images"),
    (bad_zero_byte_file, "zero-byte"),
    (bad_zero_byte_nifti, "zero-byte"),
    (bad_random_bytes, "not a DICOM"),
    (bad_truncated_slice_in_series, "truncated"),
    (bad_truncated_single_file, "truncated"),
    (bad_truncated_nifti_gz, "cannot read"),
    (bad_truncated_nii, "cannot read"),
    (bad_structured_report, "without image data"),
    (bad_rt_struct, "without image data"),
    (bad_folder_of_non_images, "no DICOM images"),
    (bad_rgb_secondary_capture, "colour"),
    (bad_single_2d_slice, "2D"),
    (bad_folder_with_one_slice, "2D"),
    (bad_2d_metaimage, "2D"),
    (bad_inconsistent_slice_sizes, "inconsistent slice sizes"),
    (bad_nan_voxels, "NaN"),
    (bad_inf_voxels, "infinite"),
    (bad_absurd_nifti_header, "absurd"),
    (bad_absurd_nrrd_header, "absurd"),
    (bad_absurd_dicom_frames, "refusing to allocate"),
    (bad_rgb_nifti, "colour"),
    (bad_duplicate_positions, "same slice position"),
    (bad_mhd_without_data, "cannot read"),
    (bad_unknown_format, "not a DICOM, NIfTI"),
    (bad_nan_rescale_slope, "rescale"),
]


@pytest.mark.parametrize("make_input, reason", BAD_INPUTS, ids=[f.__name__[4:] for f, _ in BAD_INPUTS])
def test_bad_input_raises_volume_read_error_naming_the_file(tmp_path, make_input, reason):
    path, named = make_input(tmp_path)
    with pytest.raises(VolumeReadError) as caught:
        load_volume(path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert str(named) in str(error) and error.path == str(named)
    assert reason in error.reason
    assert "\n" not in str(error)


def test_unknown_series_uid_lists_the_available_ones(tmp_path):
    path, named = bad_unknown_series_uid(tmp_path)
    with pytest.raises(VolumeReadError, match="not found; available") as caught:
        load_volume(path, series_uid="1.2.3.4")
    assert caught.value.path == str(named)
