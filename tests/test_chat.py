"""Chat dock + routing view in a real napari viewer under Xvfb, with a tiny random TGH-MoE model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_tghmoe.io import CTVolume, load_volume, write_dicom_series
from napari_tghmoe.layers import ct_layer_kwargs
from napari_tghmoe._widgets.chat import ChatWidget
from napari_tghmoe._widgets.routing_view import RoutingView

REPO = Path(__file__).resolve().parents[1]


def _ct_volume(shape=(12, 48, 40)) -> CTVolume:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.where((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (shape[2] / 2.5) ** 2, 40, -1000)
    hu = (hu + 30 * np.sin(z)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(2.5, 0.8, 0.7), origin=(-20.0, -30.0, 100.0), description="CT ABDOMEN")


@pytest.fixture
def chat_factory(tmp_path, tiny_tghmoe_folder, qtbot):
    created = []

    def make(viewer, *, max_new_tokens=6, model=None):
        chat = ChatWidget(
            viewer,
            transcript_path=tmp_path / "transcript.jsonl",
            settings_file=tmp_path / "settings.json",
            model_path=model or tiny_tghmoe_folder,
            device_choice="CPU",
            max_new_tokens=max_new_tokens,
        )
        viewer.window.add_dock_widget(chat, name="Chat", area="right")
        created.append(chat)
        return chat

    yield make
    for chat in created:
        chat.shutdown()


def _ask(qtbot, chat, question, timeout=60_000):
    assert chat.send(question)
    qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=timeout)
    return chat.latest_record()


def _world_box(layer) -> np.ndarray:
    """World coordinates of the layer's outer voxel faces: (first corner, last corner)."""
    shape = np.asarray(layer.data.shape, dtype=float)
    return np.stack([layer.data_to_world(np.full(3, -0.5)), layer.data_to_world(shape - 0.5)])


def _cell_of_voxel(n_cells: int, n_voxels: int) -> np.ndarray:
    """The token cell holding each CT voxel's centre along one axis."""
    return np.floor((np.arange(n_voxels) + 0.5) * n_cells / n_voxels).astype(int)


def _assert_token_grid_over_the_ct(overlay, ct, grid):
    """The overlay holds the routing token grid (not a CT-sized copy) and covers the CT's box."""
    assert overlay.data.shape == tuple(grid)
    assert overlay.data.size * 10 <= ct.data.size
    coarse_voxel = np.asarray(overlay.scale)
    np.testing.assert_allclose(coarse_voxel, np.asarray(ct.scale) * np.asarray(ct.data.shape) / np.asarray(grid))
    assert (np.abs(overlay.extent.world - ct.extent.world) < coarse_voxel).all()  # within one coarse voxel
    np.testing.assert_allclose(_world_box(overlay), _world_box(ct), atol=1e-6)
    assert overlay.units == ct.units


def test_send_streams_into_the_transcript_and_records_the_answer(make_napari_viewer, chat_factory, qtbot, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    chat = chat_factory(viewer)
    assert chat.current_layer() is layer
    streamed = []
    chat.text_streamed.connect(lambda turn_id, text: streamed.append(text))

    chat.question_box.setPlainText("Is there a liver lesion?")
    qtbot.keyClick(chat.question_box, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert "\n" in chat.question_box.toPlainText() and not chat.is_busy  # Shift+Enter: new line only
    chat.question_box.setPlainText("Is there a liver lesion?")
    qtbot.keyClick(chat.question_box, Qt.Key.Key_Return)  # Enter sends
    qtbot.waitUntil(lambda: not chat.is_busy and chat.latest_record() is not None, timeout=60_000)

    record = chat.latest_record()
    assert record.question == "Is there a liver lesion?"
    assert len(streamed) >= 2, "text should arrive in several chunks"
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # grows chunk by chunk
    assert record.answer.text and streamed[-1].strip() == record.answer.text
    lines = chat.transcript_texts()
    assert lines[-2].endswith("You: Is there a liver lesion?") and lines[-1].startswith("[")
    assert record.answer.text in lines[-1]
    saved = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert saved[-1]["role"] == "assistant" and saved[-1]["meta"]["report"]["answer"] == record.answer.text
    assert "untrained placeholder model" in chat.status_text() and "tokens/s" in chat.status_text()
    assert chat.question_box.toPlainText() == ""


def test_stop_ends_the_answer_and_a_plain_image_layer_works(make_napari_viewer, chat_factory, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((8, 40, 40), -500, np.float32), scale=(3.0, 0.5, 0.5), name="plain")
    chat = chat_factory(viewer, max_new_tokens=2000)
    chat.text_streamed.connect(lambda *_: chat.stop())

    record = _ask(qtbot, chat, "Describe the liver.")

    assert record.stopped and record.answer.stopped
    assert record.answer.timings["n_tokens"] < 50  # far from the 2000 allowed
    assert record.answer.tokens_after_stop <= 1
    assert chat.transcript_texts()[-1].endswith("[stopped]")
    assert record.volume.spacing == (3.0, 0.5, 0.5)
    assert chat.send_button.isEnabled() and not chat.stop_button.isEnabled()


def test_bad_model_folder_notifies_and_the_panel_recovers(
    make_napari_viewer, chat_factory, qtbot, tmp_path, tiny_tghmoe_folder
):
    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "readme.txt").write_text("nothing here")
    notes = []
    notification_manager.notification_ready.connect(notes.append)
    chat = chat_factory(viewer, model=bad)

    assert chat.send("Is there a liver lesion?")
    qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=30_000)

    assert any("not-a-model" in str(n.message) for n in notes)
    assert "Error:" in chat.transcript_texts()[-1] and "not-a-model" in chat.transcript_texts()[-1]
    assert chat.send_button.isEnabled() and chat.latest_record() is None

    chat.set_model_folder(tiny_tghmoe_folder)  # then a good folder works
    record = _ask(qtbot, chat, "Is there a liver lesion?")
    assert record is not None and record.answer.text
    assert json.loads((tmp_path / "settings.json").read_text())["model"] == str(tiny_tghmoe_folder)

    viewer.layers.clear()  # no CT layer: a notification and a transcript line, nothing crashes
    assert not chat.send("What organ is this?")
    assert "No CT layer" in chat.transcript_texts()[-1]


def test_device_picker_says_what_fits_and_a_choice_that_does_not_is_refused_before_loading(
    make_napari_viewer, chat_factory, qtbot, monkeypatch, tiny_tghmoe_folder
):
    """Before loading, each device item says what the model needs against what is free; with too
    little free, the item is marked and loading is refused with a notification (no load starts,
    the dock stays usable); once enough is free, the picker says so and the model loads."""
    import torch

    from napari_tghmoe import conversation
    from napari_tghmoe.model import memory

    free = {"bytes": 1 << 20}  # 1 MiB free: the tiny model (~0.3 GiB to run) does not fit
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": free["bytes"])
    loads = []
    real_load = conversation.load_engine
    monkeypatch.setattr(conversation, "load_engine", lambda choice: loads.append(choice) or real_load(choice))
    notes = []
    notification_manager.notification_ready.connect(notes.append)
    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    chat = chat_factory(viewer)
    combo = chat.device_combo
    combo.setCurrentText("auto")
    combo.setCurrentText("CPU")  # the user's choice
    qtbot.waitUntil(lambda: chat.device_fit("CPU") is not None, timeout=30_000)  # checked in a worker

    cpu = combo.findText("CPU")
    tip = combo.itemData(cpu, Qt.ItemDataRole.ToolTipRole)
    assert tip.startswith("CPU: does not fit: needs ") and "1 MiB free" in tip, tip
    assert not combo.itemIcon(cpu).isNull()  # marked: a warning icon (in the list and on the closed box)
    assert "CPU: does not fit" in chat.status_text() and "does not fit" in combo.toolTip()
    if not torch.cuda.is_available():
        cuda_tip = combo.itemData(combo.findText("CUDA 4-bit"), Qt.ItemDataRole.ToolTipRole)
        assert cuda_tip == "CUDA 4-bit: not available: no CUDA device"
        assert combo.itemIcon(combo.findText("CUDA 4-bit")).isNull()  # unavailable, not "does not fit"

    assert chat.send("Is there a liver lesion?")  # loading is asked for: refused, no load starts
    qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=30_000)
    assert loads == [] and chat.engine is None and chat.latest_record() is None
    refusals = [str(n.message) for n in notes if "not enough memory" in str(n.message)]
    assert refusals, [str(n.message) for n in notes]
    refusal = refusals[-1]
    assert tiny_tghmoe_folder.name in refusal and "needs about" in refusal and "free" in refusal
    assert "Error: Cannot load model" in chat.transcript_texts()[-1]  # and a transcript line
    assert chat.send_button.isEnabled() and combo.isEnabled() and chat.question_box.isEnabled()

    free["bytes"] = 64 * 2**30  # memory was freed: the picker shows it, and loading goes ahead
    chat.refresh_device_fits()
    qtbot.waitUntil(lambda: bool(chat.device_fit("CPU").fits), timeout=30_000)
    tip = combo.itemData(cpu, Qt.ItemDataRole.ToolTipRole)
    assert tip.startswith("CPU: ~") and "of 64.0 GiB free (fp32 on cpu)" in tip, tip
    assert combo.itemIcon(cpu).isNull() and "does not fit" not in chat.status_text()
    record = _ask(qtbot, chat, "Is there a liver lesion?")
    assert record is not None and record.answer.text
    assert [choice.device for choice in loads] == ["CPU"]
    notification_manager.notification_ready.disconnect(notes.append)


def test_routing_view_overlay_matches_the_ct_and_follows_the_selected_answer(
    make_napari_viewer, chat_factory, qtbot
):
    viewer = make_napari_viewer()
    volume = _ct_volume()
    ct = viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    chat = chat_factory(viewer)
    routing = RoutingView(viewer)  # finds the chat's conversation of this viewer on its own
    viewer.window.add_dock_widget(routing, name="Routing", area="right")

    first = _ask(qtbot, chat, "Generate a radiology report.")
    second = _ask(qtbot, chat, "Which organ shows an abnormality in this scan?")
    assert routing.record is second  # the latest answer by default
    qtbot.waitUntil(lambda: routing.rendered_turn == second.turn_id, timeout=30_000)
    assert first.answer.prompt_kind == "report" and second.answer.prompt_kind == "question"

    labels = routing.update_overlay(create=True)
    assert labels.name.startswith("routing: block")
    trace, block = second.answer.routing, routing.current_block()
    grid = trace.weights_for(block).shape[:3]
    _assert_token_grid_over_the_ct(labels, ct, grid)
    n_experts = len(trace.expert_names)
    dominant = trace.expert_map(block)  # on the token grid
    owners = [_cell_of_voxel(g, n) for g, n in zip(grid, ct.data.shape)]
    body = ct.data >= -500
    for cell in np.ndindex(*grid):
        inside = body[np.ix_(*[np.flatnonzero(o == c) for o, c in zip(owners, cell)])]
        if inside.all():
            assert labels.data[cell] == dominant[cell] + 1, cell
        elif not inside.any():
            assert labels.data[cell] == 0, cell  # air stays see-through
    assert labels.data.max() <= n_experts and (labels.data >= 1).any()
    # what the viewer draws at a CT voxel is that voxel's dominant expert at full resolution
    full = trace.expert_map(block, ct.data.shape)
    for voxel in [(0, 24, 20), (5, 20, 16), (11, 28, 24), (7, 24, 12)]:  # inside the body
        cell = np.floor(labels.world_to_data(ct.data_to_world(voxel)) + 0.5).astype(int)
        assert labels.data[tuple(cell)] == full[voxel] + 1, voxel

    routing.expert_combo.setCurrentIndex(1)  # first expert's weight as a heatmap
    heat = routing.update_overlay()
    assert heat.name.endswith(f"{trace.expert_names[0]} weight")
    assert heat.data.dtype == np.float32
    _assert_token_grid_over_the_ct(heat, ct, grid)
    np.testing.assert_allclose(heat.data, trace.weights_for(block)[..., 0])
    assert sum(layer.name.startswith("routing:") for layer in viewer.layers) == 1
    assert chat.current_layer() is ct  # the overlay never becomes the chat's CT

    bars = routing.figure.axes[0].patches
    heights = [bar.get_width() for bar in bars]
    assert heights == pytest.approx(list(second.answer.task_probs.values()))

    chat.select_answer(first.turn_id)  # picking another answer updates plots and overlay
    assert routing.record is first
    qtbot.waitUntil(lambda: routing.rendered_turn == first.turn_id, timeout=30_000)
    assert routing.overlay_layer.name.endswith(f"{first.answer.routing.expert_names[0]} weight")
    assert [bar.get_width() for bar in routing.figure.axes[0].patches] == pytest.approx(
        list(first.answer.task_probs.values())
    )
    assert routing.answer_combo.currentData() == first.turn_id


def test_export_from_the_dock_writes_every_format_without_the_patient_name(
    make_napari_viewer, chat_factory, qtbot, tmp_path, monkeypatch
):
    monkeypatch.setenv("TGHMOE_DEID_SECRET", str(tmp_path / "deid-secret"))  # not the user's key
    folder = tmp_path / "dicom"
    write_dicom_series(_ct_volume(), folder, patient_name="Doe^Jane", patient_id="MRN-4711")
    volume = load_volume(folder)
    viewer = make_napari_viewer()
    viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    chat = chat_factory(viewer)
    _ask(qtbot, chat, "Generate a radiology report.")

    assert not chat.identifiers_check.isChecked()
    written = [chat.export_answer(tmp_path / f"out{suffix}") for suffix in (".txt", ".md", ".json", ".dcm")]

    for path in written:
        data = path.read_bytes()
        assert data and b"Doe" not in data and b"MRN-4711" not in data, path
    report = json.loads(written[2].read_text())
    assert report["answer"] == chat.latest_record().answer.text and report["routing_summary"]["blocks"]
    sr = pydicom.dcmread(written[3])
    # de-identified SR: a pseudonymous patient in a pseudonymous study, source UIDs remapped
    assert sr.PatientID.startswith("ANON-") and sr.PatientIdentityRemoved == "YES"
    assert sr.StudyInstanceUID != volume.study_uid
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID != volume.series_uid

    # the npe2 writer (File > Save) writes the layer's latest report, never over a file
    saved = viewer.layers.save(str(tmp_path / "via_writer.md"), selected=False, plugin="napari-tghmoe")
    assert Path(saved[0]).read_text().startswith("# CT report")
    with pytest.raises(Exception, match="exists"):
        viewer.layers.save(str(written[0]), selected=False, plugin="napari-tghmoe")

    chat.identifiers_check.setChecked(True)
    named = pydicom.dcmread(chat.export_answer(tmp_path / "named.dcm"))
    assert str(named.PatientName) == "Doe^Jane" and named.StudyInstanceUID == volume.study_uid


def test_closing_the_viewer_mid_answer_is_clean(make_napari_viewer, chat_factory, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    chat = chat_factory(viewer, max_new_tokens=5000)
    streamed = []
    chat.text_streamed.connect(lambda *_: streamed.append(1))
    assert chat.send("Describe everything in detail.")
    qtbot.waitUntil(lambda: len(streamed) > 2, timeout=60_000)

    viewer.close()

    assert chat.conversation.generation_done.is_set()  # the generation thread ended with the window
    saved = chat.transcript.turns[-1]
    assert saved.role == "assistant" and saved.text.endswith("[viewer closed]")


def test_whole_window_screenshot(make_napari_viewer, chat_factory, qtbot, tmp_path):
    from napari_tghmoe._widgets.main_window import save_window_screenshot, setup_viewer
    from napari_tghmoe.phantom import make_phantom

    viewer = make_napari_viewer(show=True)
    from napari_tghmoe._widgets._napari_private import main_qt_window

    main_qt_window(viewer).resize(1600, 1000)
    setup_viewer(viewer, make_phantom(0, "chest", shape=(24, 96, 128)).volume)
    chat = chat_factory(viewer, max_new_tokens=24)
    routing = RoutingView(viewer)
    viewer.window.add_dock_widget(routing, name="Routing", area="right")
    record = _ask(qtbot, chat, chat.quick_buttons["Generate report"].toolTip(), timeout=120_000)
    routing.update_overlay(create=True)
    assert routing.wait_until_rendered()

    target = REPO / "docs" / "screenshot.png" if os.environ.get("TGHMOE_UPDATE_SCREENSHOT") else tmp_path / "shot.png"
    path = save_window_screenshot(viewer, target)

    from imageio.v3 import imread

    image = np.asarray(imread(path))[..., :3].astype(float)
    assert image.shape[0] >= 600 and image.shape[1] >= 1000
    assert image.std() > 20  # not a blank or single-colour window
    right = image[:, int(image.shape[1] * 0.7):]  # the docks with the chat and the plot
    assert right.std() > 10
    assert record.answer.text in chat.transcript_texts()[-1]


def test_the_token_grid_overlay_lines_up_with_a_rotated_sheared_full_size_ct():
    """A 300x512x512 CT: the overlay stays the token grid and its voxel faces meet the CT's."""
    from itertools import product

    from napari.layers import Image, Labels

    from napari_tghmoe._widgets.routing_view import token_grid_geometry

    shape, grid = (300, 512, 512), (150, 37, 37)  # 512 / 37: cells of a non-integer voxel count
    angle = np.deg2rad(12.0)
    rotate = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    ct = Image(np.broadcast_to(np.int16(-1000), shape), scale=(1.25, 0.7, 0.68), translate=(-200.0, 30.0, -180.0),
               rotate=rotate, shear=(0.0, 0.05, 0.0), contrast_limits=(-1000, 400))

    overlay = Labels(np.zeros(grid, np.int32), **token_grid_geometry(ct, grid))

    assert overlay.data.nbytes < 1_000_000  # a CT-sized int32 copy would be 300 MB
    for corner in product(*[(-0.5, n - 0.5) for n in shape]):
        cell_corner = [-0.5 if c < 0 else g - 0.5 for c, g in zip(corner, grid)]
        np.testing.assert_allclose(overlay.data_to_world(cell_corner), ct.data_to_world(corner), atol=1e-6)
    factor = np.asarray(shape) / np.asarray(grid)
    voxel = np.array([17.0, 300.0, 41.0])  # a CT voxel centre lands where expert_map puts it
    np.testing.assert_allclose(overlay.world_to_data(ct.data_to_world(voxel)), (voxel + 0.5) / factor - 0.5, atol=1e-6)


def test_docks_opened_from_the_plugins_menu_find_each_other_in_either_order(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, tiny_tghmoe_folder
):
    monkeypatch.setenv("TGHMOE_USER_DIR", str(tmp_path / "user"))  # the chat's own transcript and settings
    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    _, routing = viewer.window.add_plugin_dock_widget("napari-tghmoe", "Expert routing")  # routing first
    assert routing.conversation is None and routing.record is None
    _, chat = viewer.window.add_plugin_dock_widget("napari-tghmoe", "Ask the CT model")
    try:
        assert routing.conversation is chat.conversation
        chat.device_combo.setCurrentText("CPU")
        chat.max_new_tokens = 6
        chat.set_model_folder(tiny_tghmoe_folder)
        record = _ask(qtbot, chat, "Is there a liver lesion?")

        assert record is not None and routing.record is record
        qtbot.waitUntil(lambda: routing.rendered_turn == record.turn_id, timeout=30_000)
        late = RoutingView(viewer)  # a routing dock opened after the answer shows it at once
        viewer.window.add_dock_widget(late, name="Routing 2", area="right")
        assert late.record is record and late.answer_combo.currentData() == record.turn_id
        assert late.wait_until_rendered()
        assert (tmp_path / "user" / "transcript.jsonl").is_file()

        chat.max_new_tokens = 5000
        streamed = []
        chat.text_streamed.connect(lambda *_: streamed.append(1))
        assert chat.send("Describe everything in detail.")
        qtbot.waitUntil(lambda: len(streamed) > 2, timeout=60_000)
        viewer.close()  # a dock from the Plugins menu shuts down with the window too
        assert chat.conversation.generation_done.is_set()
        assert chat.transcript.turns[-1].text.endswith("[viewer closed]")
    finally:
        chat.shutdown()
