"""Plane-slice awareness: the words and slab a "this slice" question sends, the plane tracker, the chat."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import Dims

from napari_tghmoe.io import CTVolume
from napari_tghmoe.layers import ct_layer_kwargs
from napari_tghmoe.slice_context import (
    PlaneTracker,
    is_slice_question,
    slice_context,
    slice_index,
)


def _volume(shape=(120, 40, 30)) -> CTVolume:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    return CTVolume(hu=hu, spacing=(2.5, 0.8, 0.7), origin=(-20.0, -30.0, -256.0), description="CT CHEST")


def test_axial_slice_words_and_slab_on_the_ct_geometry():
    volume = _volume()

    context = slice_context(volume, "axial", 41)

    z = -256.0 + 41 * 2.5  # axial: slice k lies at origin z + k * spacing
    assert context.text == f"axial slice 42 of 120 (z = {z:.1f} mm)"
    assert context.slab_range == (37, 46)  # 20 mm at 2.5 mm: 4 slices either side
    assert np.array_equal(context.slab.hu, volume.hu[37:46])
    np.testing.assert_allclose(context.slab.index_to_patient((0, 0, 0)), volume.index_to_patient((37, 0, 0)))
    np.testing.assert_allclose(context.slab.spacing, volume.spacing)
    expected_translate = np.asarray(volume.napari_translate()) + np.array([37 * 2.5, 0.0, 0.0])
    np.testing.assert_allclose(context.slab.napari_translate(), expected_translate)  # a slab layer lines up
    question = context.question_for_model("What is on this slice?")
    assert question.startswith(f"This is axial slice 42 of 120 (z = {z:.1f} mm)") and "9 slices" in question
    assert question.endswith("What is on this slice?")


@pytest.mark.parametrize(("plane", "axis", "name"), [("coronal", 1, "y"), ("sagittal", 2, "x")])
def test_coronal_and_sagittal_slabs_cut_along_their_own_axis(plane, axis, name):
    volume = _volume()
    index = 10

    context = slice_context(volume, plane, index)

    position = volume.origin[{"y": 1, "x": 0}[name]] + index * volume.spacing[axis]
    assert context.text == f"{plane} slice 11 of {volume.shape[axis]} ({name} = {position:.1f} mm)"
    start, stop = context.slab_range
    assert start <= index < stop and stop - start == 2 * round(10.0 / volume.spacing[axis]) + 1
    assert np.array_equal(context.slab.hu, np.take(volume.hu, range(start, stop), axis=axis))
    other = [a for a in range(3) if a != axis]
    assert [context.slab.shape[a] for a in other] == [volume.shape[a] for a in other]


def test_slab_keeps_its_thickness_at_the_edge_and_bad_requests_are_refused():
    volume = _volume()
    assert slice_context(volume, "axial", 0).slab_range == (0, 9)
    assert slice_context(volume, "axial", 119).slab_range == (111, 120)
    thin = _volume(shape=(4, 8, 8))
    assert slice_context(thin, "axial", 2).slab_range == (0, 4)  # the whole scan when it is thinner
    with pytest.raises(ValueError, match="outside"):
        slice_context(volume, "axial", 120)
    with pytest.raises(ValueError, match="plane"):
        slice_context(volume, "oblique", 3)


def test_slice_index_follows_the_layer_geometry():
    scale, translate = (2.5, 0.8, 0.7), (-256.0, -30.0, -20.0)
    assert slice_index((-256.0 + 41 * 2.5 + 0.4, 0.0, 0.0), scale, translate, "axial", 120) == 41
    assert slice_index((0.0, -30.0 + 10 * 0.8, 0.0), scale, translate, "coronal", 40) == 10
    assert slice_index((0.0, 0.0, 1e6), scale, translate, "sagittal", 30) == 29  # clamped


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is on this slice?", True),
        ("Describe the current image", True),
        ("Is there a nodule on this axial slice?", True),
        ("what do you see in this coronal plane", True),
        ("What is shown on screen?", True),
        ("Generate a radiology report.", False),
        ("Is there a liver lesion?", False),
        ("Which slice thickness was used?", False),
    ],
)
def test_slice_questions_are_recognised(question, expected):
    assert is_slice_question(question) is expected


def test_plane_tracker_reads_scrolls_and_clicks_from_the_cursor():
    dims = Dims(ndim=3, ndisplay=3)
    dims.set_range(range(3), [(0, 100, 1)] * 3)
    tracker = PlaneTracker(dims)
    assert tracker.plane == "axial"  # before any move, 3D canvas

    dims.point = (10.0, 0.0, 0.0)  # scroll through z
    assert tracker.plane == "axial"
    dims.point = (10.0, 5.0, 0.0)  # scroll through y
    assert tracker.plane == "coronal"
    dims.point = (20.0, 7.0, 0.0)  # a click that moved z and y: in the sagittal plane
    assert tracker.plane == "sagittal"
    dims.point = (30.0, 9.0, 11.0)  # a jump (to a finding): the plane is kept
    assert tracker.plane == "sagittal"
    tracker.disconnect()
    dims.point = (30.0, 9.0, 12.0)
    assert tracker.plane == "sagittal"

    flat = Dims(ndim=3, ndisplay=2)
    flat.order = (2, 0, 1)  # a 2D canvas showing z and y: it is the sagittal plane
    assert PlaneTracker(flat).plane == "sagittal"


def test_this_slice_quick_action_sends_the_plane_slice_and_slab(make_napari_viewer, qtbot, tmp_path, tiny_tghmoe_folder):
    from napari_tghmoe._widgets.chat import ChatWidget

    volume = _volume(shape=(24, 40, 30))
    viewer = make_napari_viewer()
    layer = viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    chat = ChatWidget(
        viewer,
        transcript_path=tmp_path / "transcript.jsonl",
        settings_file=tmp_path / "settings.json",
        model_path=tiny_tghmoe_folder,
        device_choice="CPU",
        max_new_tokens=4,
    )
    viewer.window.add_dock_widget(chat, name="Chat", area="right")
    try:
        point = list(viewer.dims.point)
        point[1] = layer.translate[1] + 12 * layer.scale[1]  # the user scrolls the coronal view to slice 12
        viewer.dims.point = tuple(point)

        chat.quick_buttons["This slice"].click()
        qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=120_000)
    finally:
        chat.shutdown()

    record = chat.latest_record()
    y = volume.origin[1] + 12 * 0.8
    words = f"coronal slice 13 of 40 (y = {y:.1f} mm)"
    assert record is not None and words in record.answer.question
    assert record.answer.question.endswith("What is on this slice?")
    assert record.volume.shape == (24, 25, 30)  # 20 mm at 0.8 mm: 12 rows either side of the slice
    assert np.array_equal(record.volume.hu, volume.hu[:, 0:25, :])
    assert record.box == ((0, 24), (0, 25), (0, 30))  # where the slab lies: the routing overlay covers it
    assert record.whole_volume.shape == volume.shape
    assert any(words in line and "You:" in line for line in chat.transcript_texts())
