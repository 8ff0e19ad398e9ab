"""The napari side: reader/writer/sample contributions, window/level dock, orthogonal views.

Viewers run under Xvfb (pytest-xvfb); volumes are tiny so each test takes a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_tghmoe.io import CTVolume, load_volume, write_dicom_series, write_nifti
from napari_tghmoe.layers import (
    CT_VOLUME_KEY,
    DEFAULT_PRESET,
    WINDOW_PRESETS,
    ct_layer_data,
    window_to_contrast_limits,
)

PLUGIN = "napari-tghmoe"
SPACING = (5.0, 0.8, 0.7)


def tiny_ct(window: tuple[float, float] | None = (50.0, 350.0), description: str = "Tiny chest") -> CTVolume:
    """8 x 24 x 32 voxels: air around a soft-tissue block with a bone rod, anisotropic."""
    hu = np.full((8, 24, 32), -1000, dtype=np.int16)
    hu[1:7, 4:20, 4:28] = 40
    hu[:, 14:18, 14:18] = 700
    return CTVolume(hu=hu, spacing=SPACING, origin=(-10.0, -20.0, 30.0), description=description, window=window)


@pytest.fixture
def error_messages(monkeypatch):
    """Messages passed to napari's show_error by our reader."""
    import napari.utils.notifications as notifications

    messages: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda message: messages.append(str(message)))
    return messages


# ------------------------------------------------------------------ reader (no viewer)
def test_get_reader_accepts_ct_paths_and_refuses_others(tmp_path):
    from napari_tghmoe._reader import get_reader, read_ct

    folder = tmp_path / "series"
    write_dicom_series(tiny_ct(), folder)
    dicom_file = sorted(folder.iterdir())[0]
    suffixless = tmp_path / "IM0001"
    suffixless.write_bytes(dicom_file.read_bytes())
    not_dicom = tmp_path / "README"
    not_dicom.write_text("hello")
    nifti = write_nifti(tiny_ct(), tmp_path / "ct.nii.gz")

    for path in (folder, dicom_file, suffixless, nifti, tmp_path / "x.mha", tmp_path / "x.nrrd"):
        assert get_reader(str(path)) is read_ct, path
    for path in (not_dicom, tmp_path / "photo.png", [str(folder), str(nifti)]):
        assert get_reader(path if isinstance(path, list) else str(path)) is None, path


def test_manifest_routes_suffixless_dicom_names_only_to_us():
    import npe2

    manager = npe2.PluginManager.instance()
    manager.discover()

    def readers(name: str) -> set[str]:
        return {reader.plugin_name for reader in manager.iter_compatible_readers([f"/d/{name}"])}

    assert readers("IM-0001-0001") == {PLUGIN}
    assert readers("CT5N") == {PLUGIN}
    assert PLUGIN in readers("scan.nii.gz")
    assert PLUGIN not in readers("photo.png")  # never competes for ordinary images


# ------------------------------------------------------------------ reader via napari
def test_open_dicom_folder_sets_scale_name_window_and_volume(make_napari_viewer, tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(tiny_ct(window=(50.0, 350.0)), folder, shuffle_names=True, series_description="Tiny chest")
    viewer = make_napari_viewer()

    layers = viewer.open(str(folder), plugin=PLUGIN)

    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "Tiny chest"
    np.testing.assert_allclose(layer.scale, SPACING, rtol=1e-4)
    np.testing.assert_allclose(layer.contrast_limits, window_to_contrast_limits(50.0, 350.0))
    volume = layer.metadata[CT_VOLUME_KEY]
    assert isinstance(volume, CTVolume)
    assert layer.data.shape == (8, 24, 32)
    np.testing.assert_allclose(layer.translate, volume.napari_translate())
    assert layer.data[4, 15, 15] == 700 and layer.data[4, 6, 6] == 40


def test_open_nifti_without_window_uses_soft_tissue_preset(make_napari_viewer, tmp_path):
    path = write_nifti(tiny_ct(window=None, description=""), tmp_path / "abdomen_ct.nii.gz")
    viewer = make_napari_viewer()

    (layer,) = viewer.open(str(path), plugin=PLUGIN)

    assert layer.name == "abdomen_ct"
    np.testing.assert_allclose(layer.contrast_limits, DEFAULT_PRESET.contrast_limits)
    np.testing.assert_allclose(layer.scale, SPACING, rtol=1e-4)


@pytest.mark.parametrize("content", [b"", b"\0" * 128 + b"DICM" + b"\x02\x00garbage"], ids=["empty", "truncated"])
def test_bad_file_is_one_notification_and_viewer_keeps_working(make_napari_viewer, tmp_path, error_messages, content):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(content)
    viewer = make_napari_viewer()

    added = viewer.open(str(bad), plugin=PLUGIN)

    assert added == []
    assert len(error_messages) == 1
    assert "broken.dcm" in error_messages[0]
    layer = viewer.add_image(tiny_ct().hu)  # the viewer still works
    assert layer in viewer.layers and len(viewer.layers) == 1


# ------------------------------------------------------------------ writer and samples
def test_writer_round_trips_a_ct_layer(make_napari_viewer, tmp_path):
    from napari_tghmoe._writer import write_image

    volume = tiny_ct()
    data, meta, _ = ct_layer_data(volume)
    (written,) = write_image(str(tmp_path / "out.nrrd"), data, meta)

    back = load_volume(written)
    np.testing.assert_array_equal(back.hu, volume.hu)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)


def test_chest_sample_opens_as_ct_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "chest_phantom")
    (layer,) = layers
    volume = layer.metadata[CT_VOLUME_KEY]
    np.testing.assert_allclose(layer.scale, volume.spacing)
    assert volume.spacing[0] > volume.spacing[1]  # thick slices, realistic geometry
    assert layer.metadata["phantom_report"]
    assert -1100 <= layer.data.min() and layer.data.max() > 300  # air to bone


def test_real_ct_sample_is_a_one_slice_volume_with_plausible_hu():
    pytest.importorskip("data_store", reason="pydicom-data is an optional test extra")
    from napari_tghmoe._sample_data import real_ct_slice

    ((data, kwargs, layer_type),) = real_ct_slice()
    assert layer_type == "image" and data.shape == (1, 512, 512)
    assert data.min() >= -1100 and 200 < data.max() < 4000
    assert kwargs["scale"][1] < 1.0  # sub-millimetre pixels of a real scanner


# ------------------------------------------------------------------ window / level dock
def test_window_level_presets_manual_and_from_file(make_napari_viewer, qtbot):
    from napari_tghmoe._widgets.window_level import FROM_FILE, WindowLevelWidget

    viewer = make_napari_viewer()
    volume = tiny_ct(window=(60.0, 360.0))
    data, kwargs, _ = ct_layer_data(volume)
    layer = viewer.add_image(data, **kwargs)
    widget = WindowLevelWidget(viewer)
    qtbot.addWidget(widget)

    for name, preset in WINDOW_PRESETS.items():
        widget.preset_buttons[name].click()
        np.testing.assert_allclose(layer.contrast_limits, preset.contrast_limits)
    np.testing.assert_allclose(WINDOW_PRESETS["lung"].contrast_limits, (-1350, 150))
    assert widget.width_slider.value() == 80 and widget.level_slider.value() == 40  # brain

    widget.width_slider.setValue(1000)
    widget.level_slider.setValue(-200)
    np.testing.assert_allclose(layer.contrast_limits, (-700, 300))

    widget.preset_buttons[FROM_FILE].click()
    np.testing.assert_allclose(layer.contrast_limits, (-120, 240))

    widget.set_rendering("iso-surface (bone)")
    assert str(layer.rendering) == "iso" and layer.iso_threshold == 300
    assert str(layer.depiction) == "volume"


def test_rendering_choice_reflects_the_reading_layouts_plane_and_switches_back(make_napari_viewer, qtbot):
    """The reading layout draws the CT as an axial plane beside the bone surface: the dock says
    so (not a volume rendering that is not on screen), and its choices switch both ways."""
    from napari_tghmoe._widgets.main_window import setup_viewer
    from napari_tghmoe.layers import PLANE_AT_CURSOR

    viewer = make_napari_viewer()
    workspace = setup_viewer(viewer, tiny_ct())
    layer, dock = workspace.ct_layer, workspace.window_level
    assert str(layer.depiction) == "plane"
    assert dock.rendering_combo.currentText() == PLANE_AT_CURSOR
    assert viewer.scale_bar.visible and all(str(unit) == "millimeter" for unit in layer.units)

    dock.rendering_combo.setCurrentText("MIP")
    assert str(layer.depiction) == "volume" and str(layer.rendering) == "mip"
    dock.rendering_combo.setCurrentText(PLANE_AT_CURSOR)
    assert str(layer.depiction) == "plane"
    np.testing.assert_allclose(layer.plane.normal, (1.0, 0.0, 0.0))


# ------------------------------------------------------------------ orthogonal views
def test_ortho_views_follow_position_keep_spacing_and_mirror_layers(make_napari_viewer, qtbot):
    from napari_tghmoe._widgets.ortho_views import OrthoViewsWidget

    viewer = make_napari_viewer()
    data, kwargs, _ = ct_layer_data(tiny_ct())
    layer = viewer.add_image(data, **kwargs)
    widget = OrthoViewsWidget(viewer)
    viewer.window.add_dock_widget(widget, area="bottom")
    views = widget.views

    # true anisotropic spacing and the right displayed planes
    for view in views.values():
        (mirror,) = widget.mirrored_layers(view.plane.name)
        np.testing.assert_allclose(mirror.scale, SPACING)
        assert mirror.data is layer.data  # shared, not copied
    assert views["axial"].viewer_model.dims.displayed == (1, 2)
    assert views["coronal"].viewer_model.dims.displayed == (0, 2)
    assert views["sagittal"].viewer_model.dims.displayed == (0, 1)

    # main position -> every plane and its crosshair
    target = tuple(np.asarray(layer.translate) + np.asarray(SPACING) * (5, 10, 20))
    viewer.dims.point = target
    for view in views.values():
        np.testing.assert_allclose(view.viewer_model.dims.point, target)
    axial_lines = views["axial"].crosshair.data
    assert any(np.allclose(line[:, 1], 10) for line in axial_lines)  # coronal trace at y=10
    assert any(np.allclose(line[:, 2], 20) for line in axial_lines)  # sagittal trace at x=20

    # a click in the coronal plane moves z and x, keeps the coronal slice (y)
    clicked = (target[0] + 10.0, target[1] + 3.0, target[2] - 7.0)
    widget.click_world("coronal", clicked)
    np.testing.assert_allclose(viewer.dims.point, (clicked[0], target[1], clicked[2]))
    # scrolling a plane's own slider moves the main viewer too
    views["axial"].viewer_model.dims.set_current_step(0, 2)
    assert viewer.dims.current_step[0] == 2

    # display settings and later layers (e.g. a routing overlay) follow
    layer.contrast_limits = (-1000, 500)
    assert all(np.allclose(widget.mirrored_layers(p)[0].contrast_limits, (-1000, 500)) for p in views)
    overlay = viewer.add_labels(
        np.zeros(layer.data.shape, dtype=np.uint8), name="routing: expert", scale=layer.scale, translate=layer.translate
    )
    for plane in views:
        names = [mirror.name for mirror in widget.mirrored_layers(plane)]
        assert names == [layer.name, "routing: expert"]
        np.testing.assert_allclose(widget.mirrored_layers(plane)[1].scale, SPACING)
    overlay.data = np.ones(layer.data.shape, dtype=np.uint8)
    assert widget.mirrored_layers("sagittal")[1].data.max() == 1
    viewer.layers.remove(overlay)
    assert [m.name for m in widget.mirrored_layers("axial")] == [layer.name]
