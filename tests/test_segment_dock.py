"""The Segment dock in a real napari viewer (Xvfb) with the real segmenter and a tiny random model.

The segmenter is ``napari_tghmoe.med3d.segment_volume`` on a tiny random-weight model folder
(``build_tiny_seg_model``): the label map is noise, but its geometry, names, volumes, findings
and exports are what the dock must show and save correctly, whatever the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from napari.layers import Labels, Points
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QWidget

from napari_tghmoe.io import load_volume, write_dicom_series, write_nifti
from napari_tghmoe.layers import ct_layer_kwargs
from napari_tghmoe._widgets.ortho_views import OrthoViewsWidget
from napari_tghmoe._widgets._napari_private import main_qt_window
from napari_tghmoe._widgets.segment_dock import SegmentDock, dock_segment

from conftest import SEGMENTATION_TEST_SHAPE as SHAPE  # the shared phantom_volume fixture's shape






@pytest.fixture(scope="module")
def dicom_volume(tmp_path_factory, phantom_volume):
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_dicom_series(phantom_volume, folder, patient_name="Doe^Jane", patient_id="MRN-12345")
    return load_volume(folder)


@pytest.fixture
def dock_factory(tiny_seg_model):
    created = []

    def make(viewer, model=None):
        dock = SegmentDock(viewer, model_path=model or tiny_seg_model)
        viewer.window.add_dock_widget(dock, name="Segment", area="right")
        created.append(dock)
        return dock

    yield make
    for dock in created:
        dock.shutdown()


def _segment(qtbot, dock, timeout=60_000):
    assert dock.segment()
    qtbot.waitUntil(lambda: not dock.is_busy, timeout=timeout)
    return dock.labels_layer


def _labels_layer(viewer, name):
    return next(layer for layer in viewer.layers if isinstance(layer, Labels) and layer.name == name)


def test_segment_adds_a_labels_layer_on_the_ct_with_names_volumes_and_clickable_findings(
    make_napari_viewer, dock_factory, qtbot, phantom_volume
):
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    ortho = OrthoViewsWidget(viewer)
    viewer.window.add_dock_widget(ortho, name="planes", area="bottom")
    dock = dock_factory(viewer)
    assert dock.current_layer() is ct
    contrast = tuple(ct.contrast_limits)

    _segment(qtbot, dock)

    labels = _labels_layer(viewer, f"segmentation: {ct.name}")
    assert labels is dock.labels_layer
    from napari_tghmoe._widgets._viewer_dock import layer_segmentation

    assert layer_segmentation(ct) is dock.result  # kept on the CT: the chat places stated findings with it
    assert labels.data.shape == ct.data.shape == SHAPE
    np.testing.assert_allclose(labels.scale, ct.scale)
    np.testing.assert_allclose(labels.translate, ct.translate)
    assert 0.3 <= labels.opacity <= 0.5 and labels.visible
    assert tuple(ct.contrast_limits) == contrast  # the CT's window is left alone
    for plane in ("axial", "coronal", "sagittal"):  # the plane views show it, on the CT's grid
        mirrors = [m for m in ortho.mirrored_layers(plane) if isinstance(m, Labels)]
        assert len(mirrors) == 1 and mirrors[0].data is labels.data
        np.testing.assert_allclose(mirrors[0].translate, ct.translate)

    # structure table: every label present, its volume from the voxel count, largest first
    result = dock.result
    counts = np.bincount(labels.data.ravel())
    voxel_ml = float(np.prod(phantom_volume.spacing)) / 1000.0
    expected = {result.label_names[v]: counts[v] * voxel_ml for v in np.nonzero(counts)[0] if v != 0}
    rows = dock.structure_table_rows()
    assert {name for name, _ in rows} == set(expected)
    for name, volume_text in rows:
        assert float(volume_text) == pytest.approx(expected[name], abs=0.051)
    shown = [float(v) for _, v in rows]
    assert shown == sorted(shown, reverse=True)

    # hovering a voxel names its structure in napari's status bar (Labels features)
    value = int(next(v for v in np.nonzero(counts)[0] if v != 0))
    voxel = np.argwhere(labels.data == value)[0]
    world = np.asarray(voxel) * np.asarray(ct.scale) + np.asarray(ct.translate)
    status = labels.get_status(world, world=True)
    assert f"structure: {result.label_names[value]}" in status["coordinates"]

    # findings: listed with kind, location, mL and probability, and drawn as named points
    assert len(dock.findings) == len(result.findings) >= 1, "a random model leaves speckle findings"
    assert dock.findings_list.count() == len(dock.findings)
    first = dock.findings[0]
    assert first.kind in dock.findings_list.item(0).text() and "mL" in dock.findings_list.item(0).text()
    points = next(layer for layer in viewer.layers if isinstance(layer, Points))
    assert points.name == f"findings: {ct.name}" and len(points.data) == len(dock.findings)
    assert list(points.features["kind"]) == [f.kind for f in dock.findings]

    # clicking a finding moves the shared cursor, and with it every plane, to its voxel
    index = len(dock.findings) - 1  # not the first row: a real click, not a default selection
    finding = dock.findings[index]
    item = dock.findings_list.item(index)
    dock.findings_list.scrollToItem(item)
    rect = dock.findings_list.visualItemRect(item)
    qtbot.mouseClick(dock.findings_list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())

    expected = np.asarray(finding.voxel_zyx, float) * np.asarray(ct.scale) + np.asarray(ct.translate)
    np.testing.assert_allclose(viewer.dims.point, expected, atol=1e-6)
    for view in ortho.views.values():
        np.testing.assert_allclose(view.viewer_model.dims.point, expected, atol=1e-6)
    assert dock.points_layer.selected_data == {index}

    viewer.layers.remove(dock.points_layer)  # removed by the user: a click brings it back
    dock.go_to_finding(0)
    assert any(isinstance(layer, Points) for layer in viewer.layers)



def test_save_nifti_on_the_ct_grid_with_labels_json_and_no_silent_overwrite(
    make_napari_viewer, dock_factory, qtbot, tmp_path, phantom_volume
):
    import nibabel as nib

    from napari_tghmoe.seg_export import SegExportError

    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    viewer.dims.ndisplay = 3  # the reading layout's 3D canvas: adding the labels there must not fail
    dock = dock_factory(viewer)
    _segment(qtbot, dock)
    assert viewer.layers.selection.active is ct and "structure" in dock.labels_layer.features
    assert not dock.save_seg_button.isEnabled()  # a phantom has no DICOM series to reference
    assert "DICOM" in dock.save_seg_button.toolTip()
    dock.labels_layer.data[0, 0, 0] = 1  # a user's edit is what gets saved

    nifti, sidecar = dock.save_nifti(tmp_path / "seg.nii.gz")

    write_nifti(phantom_volume, tmp_path / "ct.nii.gz")
    saved, reference = nib.load(nifti), nib.load(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(saved.affine, reference.affine, atol=1e-4)
    assert saved.shape == reference.shape
    assert np.array_equal(load_volume(nifti).hu, dock.labels_layer.data)
    assert sidecar.name == "seg.labels.json"
    mapping = json.loads(sidecar.read_text())
    assert mapping == {str(v): n for v, n in dock.result.label_names.items()}

    before = nifti.read_bytes()
    with pytest.raises(SegExportError, match="exists"):
        dock.save_nifti(nifti)
    assert nifti.read_bytes() == before


def test_dicom_seg_references_the_source_series_and_round_trips(
    make_napari_viewer, dock_factory, qtbot, tmp_path, dicom_volume
):
    import highdicom as hd
    import pydicom

    viewer = make_napari_viewer()
    viewer.add_image(dicom_volume.hu, **ct_layer_kwargs(dicom_volume))
    dock = dock_factory(viewer)
    labels = _segment(qtbot, dock).data
    assert dock.save_seg_button.isEnabled()

    path = dock.save_dicom_seg(tmp_path / "seg.dcm")

    seg = hd.seg.segread(path)
    present = [int(v) for v in np.unique(labels) if v != 0]
    assert seg.number_of_segments == len(present)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [dock.result.label_names[v] for v in present]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_volume.series_uid
    assert seg.StudyInstanceUID == dicom_volume.study_uid
    assert str(seg.PatientName) == "" and seg.PatientID == ""  # no identifiers unless asked
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == dock.result.model_name
    by_name = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    if "liver" in by_name:
        assert by_name["liver"] == "10200004"

    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(dicom_volume.source).iterdir())),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in headers], combine_segments=True, relabel=False
    )
    to_label = np.array([0, *present])
    assert np.array_equal(to_label[combined], labels)


def test_stop_ends_the_segmentation_without_a_layer(make_napari_viewer, dock_factory, qtbot, phantom_volume):
    viewer = make_napari_viewer()
    viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    dock = dock_factory(viewer)
    seen = []
    # Directly in the worker, at its first progress report: the stop is asked before the next
    # batch however busy the machine is (a queued stop could arrive after a tiny model finished).
    dock.progress_changed.connect(
        lambda done, total: (seen.append(done), dock.request_stop()), Qt.ConnectionType.DirectConnection
    )

    _segment(qtbot, dock)

    assert seen, "the segmenter reported progress"
    assert dock.result is None and not any(isinstance(layer, Labels) for layer in viewer.layers)
    assert "stopped" in dock.status_label.text().lower()
    assert dock.segment_button.isEnabled() and not dock.stop_button.isEnabled()


def test_a_wrong_model_folder_is_a_notification_not_a_crash(make_napari_viewer, qtbot, tmp_path, phantom_volume):
    viewer = make_napari_viewer()
    viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    bad = tmp_path / "not-a-seg-model"
    bad.mkdir()
    (bad / "readme.txt").write_text("nothing here")
    other = viewer.window.add_dock_widget(QWidget(), name="Other", area="right")
    notes = []
    notification_manager.notification_ready.connect(notes.append)
    dock = dock_segment(viewer, model_path=bad)  # as the launcher docks it: a tab beside the others
    try:
        qtbot.waitUntil(lambda: other in main_qt_window(viewer).tabifiedDockWidgets(dock.parentWidget()), timeout=5_000)
        _segment(qtbot, dock)
    finally:
        notification_manager.notification_ready.disconnect(notes.append)
        dock.shutdown()

    assert any("not-a-seg-model" in str(n.message) for n in notes)
    assert "not-a-seg-model" in dock.status_label.text()
    assert dock.result is None and dock.segment_button.isEnabled()
    assert not any(isinstance(layer, Labels) for layer in viewer.layers)


def test_dicom_seg_of_a_coronal_series_lands_on_the_source_frames(tmp_path):
    """The CT is reoriented to LPS on reading; the SEG must still follow the source frames."""
    import highdicom as hd
    import pydicom

    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.seg_export import save_dicom_seg

    rng = np.random.default_rng(0)
    hu = rng.integers(-100, 100, size=(6, 10, 12)).astype(np.int16)  # frames (A->P), rows (S->I), columns
    coronal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: k -> +y, j -> -z, i -> +x
    source = CTVolume(hu=hu, spacing=(3.0, 1.5, 1.0), origin=(-6.0, -9.0, 40.0), direction=coronal)
    write_dicom_series(source, tmp_path / "coronal", image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    volume = load_volume(tmp_path / "coronal")
    assert volume.shape != hu.shape  # read back axial (z, y, x): the frames are not its slices
    labels = np.select([volume.hu > 40, volume.hu < -40], [2, 1], 0).astype(np.uint8)

    path = save_dicom_seg(labels, volume, tmp_path / "seg.dcm", {1: "low", 2: "high"}, model_name="threshold")

    seg = hd.seg.segread(path)
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "coronal").iterdir()),
        key=lambda ds: int(ds.InstanceNumber),
    )
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in headers], combine_segments=True, relabel=False
    )
    expected = np.select([hu > 40, hu < -40], [2, 1], 0)  # the same rule on the source frames
    assert np.array_equal(frames, expected)


def test_an_oblique_series_is_segmented_with_a_notification_saying_it_was_resampled(
    make_napari_viewer, dock_factory, qtbot
):
    from napari_tghmoe.phantom import make_phantom

    oblique = make_phantom(11, "abdomen", spacing=(8.0, 8.0, 8.0), plane="oblique").volume
    viewer = make_napari_viewer()
    viewer.add_image(oblique.hu, **ct_layer_kwargs(oblique))
    dock = dock_factory(viewer)
    notes = []
    notification_manager.notification_ready.connect(notes.append)
    try:
        layer = _segment(qtbot, dock)
    finally:
        notification_manager.notification_ready.disconnect(notes.append)
    assert layer is not None and layer.data.shape == oblique.hu.shape  # back on the scan's own grid
    assert any("oblique series" in str(n.message) for n in notes)
