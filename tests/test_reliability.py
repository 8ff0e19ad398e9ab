"""What archives and users feed the reader and the CLI, and what the user is told.

Every scan is built here, synthetically (pydicom files written to tmp_path, nibabel and
SimpleITK images), and goes through the public entry points: ``load_volume``, the npe2 reader
``read_ct`` (whose notifications are captured), and ``tghmoe ask`` / ``tghmoe report``.
The cases already held by tests/test_io.py are listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_tghmoe.cli import main
from napari_tghmoe.io import AXIAL_DIRECTION, CTVolume, VolumeReadError, list_series, load_volume, write_dicom_series

SHAPE = (10, 24, 20)
SPACING = (2.5, 0.7, 0.8)
ORIGIN = (-7.0, -8.4, 30.0)


def make_volume(shape=SHAPE, seed=0) -> CTVolume:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    hu[:, 0, 0] = np.arange(shape[0]) * 10  # slice index readable in a corner
    return CTVolume(hu=hu, spacing=SPACING, origin=ORIGIN, direction=AXIAL_DIRECTION, description="CT TEST")


def edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def series(folder: Path, shape=SHAPE, seed=0, **kw) -> tuple[CTVolume, list[Path]]:
    volume = make_volume(shape, seed)
    return volume, write_dicom_series(volume, folder, **kw)


def finishes(function, timeout_s: float = 60.0):
    """Run ``function`` in a thread; fail (instead of hanging the suite) if it has not ended.

    A guard against hangs only, never a timing assertion: the bound is far above the time taken.
    """
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = function()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still running after {timeout_s} s: it hangs"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def warned(volume: CTVolume, *words: str) -> str:
    """The one warning holding every word (fails naming all warnings otherwise)."""
    hits = [w for w in volume.warnings if all(word in w for word in words)]
    assert hits, f"no warning with {words}: {volume.warnings}"
    return hits[0]


# =========================================================================== scans: geometry


def test_gantry_tilt_keeps_the_spacing_along_the_normal_and_says_how_far_off(tmp_path):
    volume, paths = series(tmp_path)
    for k, path in enumerate(paths):  # 0.5 mm forward per 2.5 mm step: 11.3 degrees of tilt
        edit(path, ImagePositionPatient=[ORIGIN[0], ORIGIN[1] + 0.5 * k, ORIGIN[2] + 2.5 * k])
    loaded = load_volume(tmp_path)
    message = warned(loaded, "tilt of 11.3 degrees", "without tilt correction")
    assert "4.5 mm off" in message  # the last slice: 9 steps of 0.5 mm
    assert loaded.spacing == pytest.approx(SPACING)  # along the normal, not the oblique travel
    np.testing.assert_array_equal(loaded.hu, volume.hu)


def test_two_acquisitions_in_one_series_load_the_first_with_a_warning(tmp_path):
    uid = pydicom.uid.generate_uid()
    first, paths = series(tmp_path, seed=1, series_uid=uid, name_prefix="a")
    _, later = series(tmp_path, seed=2, series_uid=uid, name_prefix="b")
    for number, group in ((1, paths), (2, later)):
        for path in group:
            edit(path, AcquisitionNumber=number)
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, first.hu)
    assert loaded.spacing == pytest.approx(SPACING)
    warned(loaded, "2 volumes share the slice positions", "loaded the first")


def test_mixed_spacing_keeps_the_finest_and_the_grid_never_passes_the_data(tmp_path):
    volume, paths = series(tmp_path, shape=(7, 24, 20))
    z = [0.0, 1.25, 2.5, 3.75, 6.75, 9.75, 12.75]  # 1.25 mm, then 3 mm (not a multiple: no gap)
    for path, offset in zip(paths, z):
        edit(path, ImagePositionPatient=[ORIGIN[0], ORIGIN[1], ORIGIN[2] + offset])
    loaded = load_volume(tmp_path)
    warned(loaded, "non-uniform slice spacing", "resampled to a uniform 1.25 mm grid")
    assert loaded.spacing[0] == pytest.approx(1.25)  # the finest, not the 3 mm median
    top = loaded.index_to_patient((loaded.shape[0] - 1, 0, 0))[2]
    assert top <= ORIGIN[2] + z[-1] + 1e-6  # no slice labelled above the last one with data
    assert loaded.shape[0] == 11  # 0 .. 12.5 mm in 1.25 mm steps
    np.testing.assert_array_equal(loaded.hu[:4], volume.hu[:4])  # the fine part is the data itself

    kept = load_volume(tmp_path, resample=False)  # the user asks: slices as they are
    assert kept.shape[0] == 7 and any("NOT resampled" in w for w in kept.warnings)


def test_resampled_grid_stops_at_the_last_slice_when_the_range_is_not_a_multiple(tmp_path):
    volume, paths = series(tmp_path, shape=(5, 24, 20))
    for path, offset in zip(paths, [0.0, 2.0, 4.0, 7.3, 9.3]):
        edit(path, ImagePositionPatient=[ORIGIN[0], ORIGIN[1], ORIGIN[2] + offset])
    loaded = load_volume(tmp_path)
    assert loaded.spacing[0] == pytest.approx(2.0)
    assert loaded.shape[0] == 5  # 0, 2, 4, 6, 8 (rounding 9.3 / 2 up would add a slice at 10)
    assert loaded.index_to_patient((4, 0, 0))[2] <= ORIGIN[2] + 9.3


def test_no_position_or_orientation_tags_order_by_instance_number_and_say_so(tmp_path):
    volume, paths = series(tmp_path, shuffle_names=True)
    for k, path in enumerate(paths):
        edit(path, ImagePositionPatient=None, ImageOrientationPatient=None, InstanceNumber=k + 1, SliceThickness=2.5)
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    assert loaded.spacing == pytest.approx(SPACING)
    warned(loaded, "no ImageOrientationPatient")
    warned(loaded, "no ImagePositionPatient", "InstanceNumber")


def test_two_slice_series_is_a_volume(tmp_path):
    volume, _ = series(tmp_path, shape=(2, 24, 20))
    loaded = load_volume(tmp_path)
    assert loaded.shape == (2, 24, 20) and loaded.spacing == pytest.approx(SPACING)
    np.testing.assert_array_equal(loaded.hu, volume.hu)


def test_zero_pixel_spacing_in_dicom_is_a_warning_not_a_silent_1_mm(tmp_path):
    _, paths = series(tmp_path)
    for path in paths:
        edit(path, PixelSpacing=[0, 0])
    loaded = load_volume(tmp_path)
    warned(loaded, "PixelSpacing", "assumed 1 mm")


# =========================================================================== scans: values


def test_pixel_values_outside_bits_stored_are_masked_as_dicom_says(tmp_path):
    volume, paths = series(tmp_path, unsigned=True)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = np.frombuffer(ds.PixelData, dtype="<u2")
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (stored | np.uint16(0xF000)).tobytes()  # garbage (e.g. overlay) above bit 11
        ds.save_as(path)
    loaded = load_volume(tmp_path)
    np.testing.assert_array_equal(loaded.hu, volume.hu)  # stored = HU + 1024 fits 12 bits


def test_huge_rescale_slope_gives_a_not_hu_warning(tmp_path):
    _, paths = series(tmp_path)
    for path in paths:
        edit(path, RescaleSlope=1000, RescaleIntercept=0)
    loaded = load_volume(tmp_path)
    assert loaded.hu.dtype == np.float32  # no int16 wrap-around
    warned(loaded, "far outside the CT range", "rescale slope")


def test_ordinary_ct_values_give_no_value_warning(tmp_path):
    series(tmp_path)
    assert not [w for w in load_volume(tmp_path).warnings if "Hounsfield" in w or "CT range" in w]


def _nifti(path: Path, data: np.ndarray, affine=None, **header) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(data, np.diag([0.8, 0.7, 2.5, 1.0]) if affine is None else affine)
    for key, value in header.items():
        image.header[key] = value
    nib.save(image, path)
    return path


def test_float_nifti_in_0_1_is_flagged_with_the_models_own_guess(tmp_path):
    from napari_tghmoe.model.preprocess import volume_intensity

    data = np.random.default_rng(0).random((20, 24, 10)).astype(np.float32)
    loaded = load_volume(_nifti(tmp_path / "normalised.nii.gz", data))
    assert volume_intensity(loaded).kind == "unit"  # the same rule the engine uses
    warned(loaded, "not Hounsfield units", "in [0")


def test_sheared_sform_is_never_silently_replaced_by_the_qform(tmp_path):
    import nibabel as nib

    data = make_volume().hu.transpose(2, 1, 0).copy()
    sheared = np.diag([0.8, 0.7, 2.5, 1.0])
    sheared[0, 1] = 0.3
    image = nib.Nifti1Image(data, sheared)
    image.set_qform(np.diag([0.8, 0.7, 2.5, 1.0]), code=1)
    image.set_sform(sheared, code=1)
    nib.save(image, tmp_path / "sheared.nii.gz")
    loaded = load_volume(tmp_path / "sheared.nii.gz")
    warned(loaded, "sheared affine", "NOT used", "qform")

    image.set_qform(None, code=0)  # nothing rigid to fall back on: refused, saying why
    nib.save(image, tmp_path / "sheared_only.nii.gz")
    with pytest.raises(VolumeReadError, match="sheared affine.*no qform") as caught:
        load_volume(tmp_path / "sheared_only.nii.gz")
    assert caught.value.path == str(tmp_path / "sheared_only.nii.gz")


def test_oblique_nifti_keeps_its_direction_and_warns(tmp_path):
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.7, 2.5])
    loaded = load_volume(_nifti(tmp_path / "oblique.nii.gz", make_volume().hu.transpose(2, 1, 0).copy(), affine))
    assert np.degrees(np.arccos(abs(loaded.direction[0, 2]))) == pytest.approx(20, abs=0.1)  # i axis turned
    warned(loaded, "oblique acquisition", "20.0 degrees")


def test_zero_voxel_size_in_nifti_is_a_warning(tmp_path):
    import nibabel as nib

    image = nib.Nifti1Image(make_volume().hu.transpose(2, 1, 0).copy(), np.diag([0.8, 0.7, 2.5, 1.0]))
    image.header["pixdim"][2] = 0.0
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "zero.nii")
    with open(tmp_path / "zero.nii", "rb") as handle:  # the file really says 0 (nibabel's load would say 1)
        assert nib.Nifti1Header.from_fileobj(handle, check=False)["pixdim"][2] == 0
    loaded = load_volume(tmp_path / "zero.nii")
    warned(loaded, "voxel size along y is zero", "1 mm")


# =========================================================================== scans: file system


def test_thousands_of_non_dicom_files_beside_a_series(tmp_path):
    volume, _ = series(tmp_path / "export" / "series")
    clutter = tmp_path / "export" / "clutter"
    clutter.mkdir()
    for n in range(3000):
        (clutter / f"note_{n:04d}.txt").write_text(f"not an image {n}\n" * 3)
    loaded = finishes(lambda: load_volume(tmp_path / "export"))  # hang guard only (about 3 s here)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    warned(loaded, "ignored 3000 file(s)")


def test_symlink_loops_end_and_a_linked_series_is_followed(tmp_path):
    volume, _ = series(tmp_path / "store" / "ct")
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "series").symlink_to(tmp_path / "store" / "ct", target_is_directory=True)
    (archive / "loop").symlink_to(archive, target_is_directory=True)  # archive/loop/loop/...
    (archive / "a").symlink_to(archive / "b")
    (archive / "b").symlink_to(archive / "a")  # a file-level loop
    loaded = finishes(lambda: load_volume(archive))
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    warned(loaded, "symbolic links")

    with pytest.raises(VolumeReadError, match="symbolic links") as caught:
        load_volume(archive / "a")
    assert caught.value.path == str(archive / "a")


def test_fifos_and_sockets_never_hang_and_are_called_what_they_are(tmp_path):
    volume, _ = series(tmp_path / "study")
    fifo = tmp_path / "study" / "IM_PIPE"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "scan.nii.gz")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "study" / "IM_SOCKET"))
    try:
        loaded = finishes(lambda: load_volume(tmp_path / "study"))
        np.testing.assert_array_equal(loaded.hu, volume.hu)
        message = warned(loaded, "ignored 2 file(s)")
        assert "named pipe (FIFO)" in message and "socket" in message and "zero-byte" not in message
        for path, kind in ((fifo, "named pipe (FIFO)"), (tmp_path / "scan.nii.gz", "named pipe (FIFO)"),
                           (tmp_path / "study" / "IM_SOCKET", "socket")):
            with pytest.raises(VolumeReadError) as caught:
                finishes(lambda p=path: load_volume(p))
            assert caught.value.path == str(path) and kind in caught.value.reason
    finally:
        listener.close()


def test_a_series_six_folders_deep_under_names_with_spaces_and_non_ascii(tmp_path):
    deep = tmp_path / "Patient Müller" / "Étude 2024" / "série 1" / "CT 胸部" / "a b" / "Ωmega"
    volume, _ = series(deep)
    loaded = load_volume(tmp_path / "Patient Müller")
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    [info] = list_series(tmp_path / "Patient Müller")
    assert info.slice_count == SHAPE[0]
    nifti = _nifti(deep / "scan ü 胸.nii.gz", make_volume().hu.transpose(2, 1, 0).copy())
    assert load_volume(nifti).shape == SHAPE


# =========================================================================== non-CT series


def _mr_series(folder: Path, modality: str = "MR") -> Path:
    sop_class = {"MR": pydicom.uid.MRImageStorage, "PT": pydicom.uid.PositronEmissionTomographyImageStorage}[modality]
    _, paths = series(folder)
    for path in paths:  # no rescale to HU
        edit(path, Modality=modality, SOPClassUID=sop_class, RescaleIntercept=None, RescaleSlope=None)
    return folder


@pytest.mark.parametrize("modality", ["MR", "PT"])
def test_non_ct_series_loads_for_viewing_with_a_warning_naming_the_modality(tmp_path, modality):
    loaded = load_volume(_mr_series(tmp_path / "scan", modality))
    assert loaded.modality == modality
    warned(loaded, f"modality is {modality}, not CT")


def test_a_decode_failure_names_the_reason(tmp_path):
    _, paths = series(tmp_path, transfer_syntax=pydicom.uid.RLELossless)
    ds = pydicom.dcmread(paths[3])
    ds.PixelData = ds.PixelData[:64] + b"\xff" * 16  # the RLE segments point past the data
    ds.save_as(paths[3])
    with pytest.raises(VolumeReadError) as caught:
        load_volume(tmp_path)
    assert caught.value.path == str(paths[3])
    reason = caught.value.reason
    assert reason.startswith("cannot decode pixel data (") and reason.endswith(")") and "\n" not in reason
    assert not reason.rstrip(")").endswith(":")  # not pydicom's dangling "raised by all available plugins:"
    assert "RLE" in reason  # the decoders' own reasons follow


# =========================================================================== the npe2 reader


@pytest.fixture
def notifications(monkeypatch):
    """What the reader shows the user, by kind (napari's show_error / show_warning)."""
    import napari.utils.notifications as notes

    shown: dict[str, list[str]] = {"error": [], "warning": []}
    monkeypatch.setattr(notes, "show_error", lambda message: shown["error"].append(str(message)))
    monkeypatch.setattr(notes, "show_warning", lambda message: shown["warning"].append(str(message)))
    return shown


def test_reader_notifies_every_warning(tmp_path, notifications):
    from napari_tghmoe._reader import get_reader

    _, paths = series(tmp_path / "gap")
    paths[4].unlink()
    reader = get_reader(str(tmp_path / "gap"))
    [(data, kwargs, kind)] = reader(str(tmp_path / "gap"))
    assert kind == "image" and data.shape == SHAPE
    assert any("1 missing slice" in n for n in notifications["warning"])

    reader = get_reader(str(_mr_series(tmp_path / "mr")))
    reader(str(tmp_path / "mr"))
    assert any("modality is MR, not CT" in n for n in notifications["warning"])
    assert not notifications["error"]


def test_reader_names_a_fifo_and_an_unexpected_failure_in_one_notification(tmp_path, notifications, monkeypatch):
    from napari_tghmoe import _reader

    os.mkfifo(tmp_path / "scan.nii")
    assert finishes(lambda: _reader.read_ct(str(tmp_path / "scan.nii"))) == [(None,)]
    assert "named pipe (FIFO)" in notifications["error"][-1] and str(tmp_path / "scan.nii") in notifications["error"][-1]

    def broken(path, *args, **kwargs):
        raise KeyError("a bug in a decoder")

    monkeypatch.setattr("napari_tghmoe.io.load_volume", broken)
    series(tmp_path / "ok")
    assert _reader.read_ct(str(tmp_path / "ok")) == [(None,)]  # not napari's "raised by all plugins"
    message = notifications["error"][-1]
    assert "unexpected error (KeyError: 'a bug in a decoder')" in message and "\n" not in message


# =========================================================================== the CLI


def _err_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


def _truncated_gzip(tmp_path: Path) -> Path:
    path = _nifti(tmp_path / "cut.nii.gz", make_volume().hu)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe.nii.gz")
    return tmp_path / "pipe.nii.gz"


def _huge_header(tmp_path: Path) -> Path:
    path = tmp_path / "huge.nhdr"
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 90000 90000 90000\nencoding: raw\n"
                    "endian: little\ndata file: huge.raw\n\n")
    (tmp_path / "huge.raw").write_bytes(b"\x00" * 64)
    return path


def _empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "nothing here").mkdir()
    return tmp_path / "nothing here"


@pytest.mark.parametrize("make_input, reason", [
    (_truncated_gzip, "truncated"), (_fifo, "named pipe (FIFO)"), (_huge_header, "refusing"),
    (_empty_folder, "empty folder"),
], ids=["truncated-gzip", "fifo", "huge-header", "empty-folder"])
def test_cli_bad_input_is_one_line_naming_it_and_exit_2(tmp_path, capsys, make_input, reason):
    path = make_input(tmp_path)
    code = finishes(lambda: main(["ask", str(path), "hello"]))
    captured = capsys.readouterr()
    lines = _err_lines(captured)
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"tghmoe ask: error: {path}: ") and reason in lines[0]


def test_cli_ask_tells_reader_warnings_on_stderr_and_in_the_json(tiny_tghmoe_folder, tmp_path, capsys):
    _, paths = series(tmp_path / "gap")
    paths[4].unlink()
    out_json = tmp_path / "answer.json"
    code = main(["ask", str(tmp_path / "gap"), "Is there a liver lesion?", "--model", str(tiny_tghmoe_folder),
                 "--max-new-tokens", "3", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in _err_lines(captured) if line.startswith("warning: ")]
    assert any(str(tmp_path / "gap") in line and "1 missing slice" in line for line in lines)
    assert "missing slice" not in captured.out  # the answer stream stays clean
    record = json.loads(out_json.read_text())
    assert any("1 missing slice" in w for w in record["warnings"])
    assert record["answer"] and record["volume"]["shape"] == list(SHAPE)  # the other fields as before


def test_cli_refuses_a_non_ct_series_in_one_line_unless_asked(tiny_tghmoe_folder, tmp_path, capsys):
    scan = _mr_series(tmp_path / "mr")
    code = main(["ask", str(scan), "Is there a lesion?", "--model", str(tiny_tghmoe_folder)])
    lines = _err_lines(capsys.readouterr())
    assert code == 2 and len(lines) == 1
    assert str(scan) in lines[0] and "modality is MR, not CT" in lines[0] and "--allow-non-ct" in lines[0]

    code = main(["ask", str(scan), "Is there a lesion?", "--model", str(tiny_tghmoe_folder), "--max-new-tokens", "2",
                 "--allow-non-ct"])
    captured = capsys.readouterr()
    assert code == 0 and "modality is MR, not CT" in captured.err  # answered, but said loudly


def test_cli_report_lists_each_bad_input_once_and_goes_on(tiny_tghmoe_folder, tmp_path, capsys):
    archive = tmp_path / "archive"
    series(archive / "good")
    _mr_series(archive / "mr")
    os.mkfifo(archive / "pipe.nii.gz")
    code = main(["report", str(archive), "--out", str(tmp_path / "out"), "--model", str(tiny_tghmoe_folder),
                 "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 1
    failures = [line.strip() for line in captured.err.split("scan(s) failed:")[1].splitlines() if line.strip()]
    assert len(failures) == 2
    assert any("mr" in f and "modality is MR" in f for f in failures)
    assert any("pipe.nii.gz" in f and "named pipe (FIFO)" in f for f in failures)
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good.txt"]


def test_cli_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(path, *args, **kwargs):
        raise ZeroDivisionError("division by zero in a decoder")

    monkeypatch.setattr("napari_tghmoe.io.load_volume", broken)
    series(tmp_path / "scan")
    code = main(["ask", str(tmp_path / "scan"), "hello"])
    captured = capsys.readouterr()
    lines = _err_lines(captured)
    assert code == 1 and len(lines) == 1 and "Traceback" not in captured.err
    assert "ZeroDivisionError: division by zero in a decoder" in lines[0] and "--debug" in lines[0]

    for argv in (["--debug", "ask", str(tmp_path / "scan"), "hello"], ["ask", str(tmp_path / "scan"), "hello", "--debug"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)


def test_cli_python_warnings_are_one_line_each(tmp_path, capsys, monkeypatch):
    import warnings

    def warns_then_fails(path, *args, **kwargs):
        with warnings.catch_warnings():  # shown whatever -W filters the test run has
            warnings.simplefilter("always")
            warnings.warn("the input was converted,\n  the answer may be unreliable", UserWarning)
        raise VolumeReadError(path, "broken on purpose")

    monkeypatch.setattr("napari_tghmoe.io.load_volume", warns_then_fails)
    code = main(["ask", str(tmp_path), "hello"])
    lines = _err_lines(capsys.readouterr())
    assert code == 2
    assert lines == [
        "tghmoe ask: warning: the input was converted, the answer may be unreliable",
        f"tghmoe ask: error: {tmp_path}: broken on purpose",
    ]


def test_broken_symlink_is_named_as_such(tmp_path, capsys):
    (tmp_path / "scan.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(VolumeReadError, match="broken symbolic link"):
        load_volume(tmp_path / "scan.nii.gz")


def test_cli_disk_full_while_writing_the_json_leaves_no_file(tiny_tghmoe_folder, tmp_path, capsys, monkeypatch):
    series(tmp_path / "scan")
    real_write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half of it reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    out_json = tmp_path / "out" / "answer.json"
    out_json.parent.mkdir()
    code = main(["ask", str(tmp_path / "scan"), "hello", "--model", str(tiny_tghmoe_folder), "--max-new-tokens", "2",
                 "--json", str(out_json)])
    lines = _err_lines(capsys.readouterr())
    assert code != 0 and "No space left on device" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert list(out_json.parent.iterdir()) == []  # neither the file nor a half-written temp file
