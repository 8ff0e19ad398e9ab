"""The chat dock as a conversation, under Xvfb through the real widgets: finding links that move
the cursor, follow-ups that carry earlier turns, questions about a box drawn on a plane view.

The tiny TGH-MoE builds its real prompt and runs; where a test needs to know what the answer
says, the answer's text is replaced by a known one after the real generation (``_script``), so
the prompt, the routing and the record are the model's own. The segmenter is the real one with
the tiny random model of the Segment dock's tests.
"""

from __future__ import annotations


import numpy as np
import pytest
from napari.layers import Points, Shapes
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_tghmoe._widgets._region_tools import REGION_LAYER_KEY
from napari_tghmoe._widgets._transcript_links import LINK_HTML_ROLE
from napari_tghmoe._widgets._viewer_dock import layer_segmentation
from napari_tghmoe._widgets.chat import ChatWidget
from napari_tghmoe._widgets.ortho_views import OrthoViewsWidget
from napari_tghmoe._widgets.routing_view import RoutingView
from napari_tghmoe._widgets.segment_dock import SegmentDock
from napari_tghmoe.layers import ct_layer_kwargs

from conftest import SEGMENTATION_TEST_SHAPE as SHAPE, script_engine_answers  # the shared phantom_volume fixture's shape






@pytest.fixture
def docks(tmp_path, tiny_tghmoe_folder, tiny_seg_model):
    created = []

    def chat(viewer, **options):
        widget = ChatWidget(
            viewer,
            transcript_path=tmp_path / "transcript.jsonl",
            settings_file=tmp_path / "settings.json",
            model_path=tiny_tghmoe_folder,
            device_choice="CPU",
            max_new_tokens=4,
            seg_model_path=options.pop("seg_model_path", tiny_seg_model),
            **options,
        )
        viewer.window.add_dock_widget(widget, name="Chat", area="right")
        created.append(widget)
        return widget

    def segment(viewer):
        widget = SegmentDock(viewer, model_path=tiny_seg_model)
        viewer.window.add_dock_widget(widget, name="Segment", area="right")
        created.append(widget)
        return widget

    def planes(viewer):
        widget = OrthoViewsWidget(viewer)
        viewer.window.add_dock_widget(widget, name="planes", area="bottom")
        return widget

    yield chat, segment, planes
    for widget in created:
        widget.shutdown()


def _script(monkeypatch, chat, texts):
    """Load the model, then script its answers (``conftest.script_engine_answers``)."""
    return script_engine_answers(monkeypatch, chat.conversation.load_model(chat._model_choice()), texts)


def _ask(qtbot, chat, question=None, *, button=None):
    before = chat.latest_record()
    if button is not None:
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    else:
        assert chat.send(question)
    qtbot.waitUntil(lambda: not chat.is_busy and chat.latest_record() is not before, timeout=60_000)
    return chat.latest_record()


def _world(layer, voxel) -> np.ndarray:
    return np.asarray(voxel, float) * np.asarray(layer.scale) + np.asarray(layer.translate)


def test_a_click_on_a_finding_link_moves_the_cursor_and_every_plane(
    make_napari_viewer, docks, qtbot, monkeypatch, phantom_volume, tmp_path
):
    new_chat, new_segment, new_planes = docks
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    ortho = new_planes(viewer)
    segment = new_segment(viewer)
    assert segment.segment()
    qtbot.waitUntil(lambda: not segment.is_busy, timeout=60_000)
    target = segment.findings[0]  # the most probable: the one a stated kind and organ go to
    where = f" in the {target.location}" if target.location else ""
    chat = new_chat(viewer)
    _script(monkeypatch, chat, [f"There is a 9 mm {target.kind}{where}. No renal cyst."])
    runs = []
    import napari_tghmoe.med3d as med3d

    monkeypatch.setattr(med3d, "segment_volume", lambda *a, **k: runs.append(1))  # must not be needed
    contrast = tuple(ct.contrast_limits)

    record = _ask(qtbot, chat, "Generate a radiology report.")
    qtbot.waitUntil(lambda: bool(record.finding_links), timeout=30_000)

    assert runs == []  # the Segment dock's result of this layer was reused
    link = record.finding_links[0]
    assert link.kind == target.kind and link.voxel_zyx == tuple(target.voxel_zyx)
    item = chat._item_for(record.turn_id)
    assert f">{target.kind}{where}</a>" in item.data(LINK_HTML_ROLE)  # a link in the transcript line
    assert "renal cyst" not in [f.kind for f in record.stated]  # "No renal cyst" states none
    points = next(l for l in viewer.layers if isinstance(l, Points) and l.name == f"answer findings: {ct.name}")
    assert list(points.features["name"]) == [link.label] and np.allclose(points.data, [target.voxel_zyx])
    assert viewer.layers.selection.active is ct and tuple(ct.contrast_limits) == contrast

    viewer.dims.point = tuple(_world(ct, (0, 0, 0)))  # somewhere else first
    rect = chat.finding_link_rect(record.turn_id, 0)
    assert rect is not None and not rect.isEmpty()
    qtbot.mouseClick(chat.transcript_view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())

    expected = _world(ct, target.voxel_zyx)
    np.testing.assert_allclose(viewer.dims.point, expected, atol=1e-6)
    for view in ortho.views.values():
        np.testing.assert_allclose(view.viewer_model.dims.point, expected, atol=1e-6)
    assert points.selected_data == {0}
    assert chat.conversation.selected_record() is record  # the click also picked the answer
    assert tuple(ct.contrast_limits) == contrast

    # the answer's JSON (the dock's export and File > Save) carries where the finding is
    import json

    located = json.loads(chat.export_answer(tmp_path / "answer.json").read_text())["located_findings"]
    assert located[0]["kind"] == target.kind and located[0]["voxel_zyx"] == list(target.voxel_zyx)
    assert located[0]["position_mm"] == pytest.approx(list(target.position_mm), abs=1e-3)
    viewer.layers.selection = {ct}
    saved = viewer.layers.save(str(tmp_path / "via_writer.json"), selected=True, plugin="napari-tghmoe")
    assert json.loads(open(saved[0]).read())["located_findings"][0]["voxel_zyx"] == list(target.voxel_zyx)


def test_a_follow_up_carries_the_first_turn_until_a_new_conversation(
    make_napari_viewer, docks, qtbot, monkeypatch, phantom_volume, tmp_path
):
    new_chat, _, _ = docks
    viewer = make_napari_viewer()
    viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    chat = new_chat(viewer)
    prompts, _ = _script(monkeypatch, chat, ["The liver is normal.", "The spleen is normal.", "Small.", "Other."])
    assert chat.context_spin.value() == 3

    first = _ask(qtbot, chat, "Is the liver normal?")
    second = _ask(qtbot, chat, "And the spleen?")

    history = prompts[1].split("<|vision_start|>")[0]
    assert "Is the liver normal?" in history and "The liver is normal." in history
    assert [c.turn_id for c in second.context] == [first.turn_id]
    lines = chat.transcript_texts()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "You: Is the liver normal?", "Model: The liver is normal.", "You: And the spleen?", "Model: The spleen is normal.",
    ]
    exported = chat.export_answer(tmp_path / "second.json")
    assert '"answer": "The liver is normal."' in exported.read_text()

    qtbot.mouseClick(chat.new_button, Qt.MouseButton.LeftButton)
    assert chat.transcript_texts() == []
    third = _ask(qtbot, chat, "And the spleen?")

    assert "Is the liver normal?" not in prompts[2] and "The liver is normal." not in prompts[2]
    assert third.context == []

    other = viewer.add_image(phantom_volume.hu.copy(), scale=(2.0, 1.0, 1.0), name="another scan")
    chat.layer_combo.setCurrentText(other.name)
    _ask(qtbot, chat, "And this one?")
    assert "The spleen is normal." not in prompts[3] and "Small." not in prompts[3]
    assert any("Note: New scan (another scan)" in line for line in chat.transcript_texts())


def test_a_box_drawn_on_the_axial_plane_asks_about_its_crop(
    make_napari_viewer, docks, qtbot, monkeypatch, phantom_volume
):
    new_chat, _, new_planes = docks
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    ortho = new_planes(viewer)
    chat = new_chat(viewer)
    routing = RoutingView(viewer)
    viewer.window.add_dock_widget(routing, name="Routing", area="right")
    prompts, shown = _script(monkeypatch, chat, ["A round structure.", "The kidney.", "The whole scan."])
    assert chat.region_text().startswith("Region: none")

    qtbot.mouseClick(chat.box_button, Qt.MouseButton.LeftButton)
    axial = ortho.views["axial"].viewer_model
    boxes = [l for l in axial.layers if isinstance(l, Shapes) and l.metadata.get(REGION_LAYER_KEY)]
    assert len(boxes) == 1 and boxes[0].mode == "add_rectangle" and axial.layers.selection.active is boxes[0]
    np.testing.assert_allclose(boxes[0].scale, ct.scale)
    z, (y0, x0), (y1, x1) = 12, (10, 8), (29, 27)  # data coordinates of the axial view: voxels
    boxes[0].add(np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], float), shape_type="rectangle")

    assert "box on axial: voxels z 12, y 10-29, x 8-27" in chat.region_text()
    drawing = [l.mode for v in ortho.views.values() for l in v.viewer_model.layers if l.metadata.get(REGION_LAYER_KEY)]
    assert drawing == ["pan_zoom"] * 3  # drawn: every plane view pans and moves the cursor again
    record = _ask(qtbot, chat, button=chat.what_button)

    sent = record.answer.question
    assert "voxels z 12, y 10-29, x 8-27" in sent and sent.endswith("What is this?")
    corner = phantom_volume.index_to_patient((12.0, 10.0, 8.0))
    assert f"{corner[0]:.1f}" in sent and "mm" in sent
    grow = [int(round(10.0 / s)) for s in phantom_volume.spacing]  # a 10 mm margin on every side
    box = tuple((max(a - g, 0), min(b + g, n)) for (a, b), g, n in zip(((12, 13), (10, 30), (8, 28)), grow, SHAPE))
    crop_shape = tuple(b - a for a, b in box)
    assert record.box == box and record.volume.shape == crop_shape
    assert shown[-1].shape == crop_shape  # the model's input is the crop
    assert np.array_equal(shown[-1].hu, phantom_volume.hu[tuple(slice(a, b) for a, b in box)])
    assert any("box on axial" in line and "You: What is this?" in line for line in chat.transcript_texts())

    # the routing overlay of the region answer lies over the crop, not over the whole CT
    qtbot.waitUntil(lambda: routing.record is record, timeout=10_000)
    overlay = routing.update_overlay(create=True)
    grid = np.asarray(overlay.data.shape, float)
    first_face = overlay.data_to_world(np.full(3, -0.5))
    last_face = overlay.data_to_world(grid - 0.5)
    np.testing.assert_allclose(first_face, ct.data_to_world(np.array([a for a, _ in box], float) - 0.5), atol=1e-6)
    np.testing.assert_allclose(last_face, ct.data_to_world(np.array([b for _, b in box], float) - 0.5), atol=1e-6)

    # a point clicked on the coronal plane replaces the box; a follow-up keeps the earlier turn
    qtbot.mouseClick(chat.point_button, Qt.MouseButton.LeftButton)
    coronal = ortho.views["coronal"].viewer_model
    marker = next(l for l in coronal.layers if isinstance(l, Points) and l.metadata.get(REGION_LAYER_KEY))
    marker.add(np.array([[6.0, 20.0, 30.0]]))
    assert "point on coronal: voxel z 6, y 20, x 30" in chat.region_text()
    assert len(boxes[0].data) == 0  # one region at a time
    near = _ask(qtbot, chat, "Which organ is this?")
    assert "voxel z 6, y 20, x 30" in near.answer.question and near.volume.shape < phantom_volume.shape
    assert "A round structure." in prompts[-1].split("<|vision_start|>")[0]

    qtbot.mouseClick(chat.clear_region_button, Qt.MouseButton.LeftButton)
    assert chat.region_text().startswith("Region: none")
    whole = _ask(qtbot, chat, "Is there a lesion?")
    assert whole.volume.shape == SHAPE and whole.box is None and shown[-1].shape == SHAPE
    assert routing.wait_until_rendered()


def test_a_stated_finding_without_a_segmented_match_has_no_link_and_no_error(
    make_napari_viewer, docks, qtbot, monkeypatch, phantom_volume, tmp_path
):
    from napari_tghmoe.med3d.encoder import DEFAULT_FINDING_KINDS

    new_chat, _, _ = docks
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom_volume.hu, **ct_layer_kwargs(phantom_volume))
    chat = new_chat(viewer)  # no Segment dock: the chat runs the segmenter after the answer
    errors = []
    notification_manager.notification_ready.connect(
        lambda n: errors.append(n) if "error" in str(getattr(n, "severity", "")).lower() else None
    )
    from napari_tghmoe.med3d import segment_volume

    found = {f.kind for f in segment_volume(phantom_volume, chat.seg_model_path).findings}
    absent = next(kind for kind in DEFAULT_FINDING_KINDS if kind not in found)
    present = sorted(found)[0]
    _script(monkeypatch, chat, [f"There is a 14 mm {absent} in the left kidney, lower pole.", f"A {present}."])

    record = _ask(qtbot, chat, "Generate a radiology report.")
    qtbot.waitUntil(lambda: record.locations_checked, timeout=60_000)

    assert [f.kind for f in record.stated] == [absent] and record.finding_links == []
    assert record.locations_note == "no segmented finding of the stated kinds"
    item = chat._item_for(record.turn_id)
    assert item.data(LINK_HTML_ROLE) is None and absent in item.text()
    assert chat.finding_link_rect(record.turn_id, 0).isEmpty()
    assert not any(isinstance(l, Points) for l in viewer.layers)
    assert errors == [] and "Error:" not in " ".join(chat.transcript_texts())
    assert "located_findings" not in chat.export_answer(tmp_path / "answer.json").read_text()
    assert layer_segmentation(ct) is not None  # kept on the layer for the next answer

    follow_up = _ask(qtbot, chat, "What else?")  # the kept segmentation places it at once
    assert follow_up.finding_links and follow_up.finding_links[0].kind == present
