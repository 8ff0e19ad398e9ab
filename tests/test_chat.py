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


def test_routing_view_overlay_matches_the_ct_and_follows_the_selected_answer(
    make_napari_viewer, chat_factory, qtbot
):
    viewer = make_napari_viewer()
    volume = _ct_volume()
    ct = viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    chat = chat_factory(viewer)
    routing = RoutingView(viewer)  # finds the chat of this viewer on its own
    viewer.window.add_dock_widget(routing, name="Routing", area="right")

    first = _ask(qtbot, chat, "Generate a radiology report.")
    second = _ask(qtbot, chat, "Which organ shows an abnormality in this scan?")
    assert routing.record is second  # the latest answer by default
    qtbot.waitUntil(lambda: routing.rendered_turn == second.turn_id, timeout=30_000)
    assert first.answer.prompt_kind == "report" and second.answer.prompt_kind == "question"

    labels = routing.update_overlay(create=True)
    assert labels.name.startswith("routing: block")
    assert labels.data.shape == ct.data.shape
    np.testing.assert_allclose(labels.scale, ct.scale)
    np.testing.assert_allclose(labels.translate, ct.translate)
    assert labels.units == ct.units
    n_experts = len(second.answer.routing.expert_names)
    body = ct.data >= -500
    assert labels.data[body].min() >= 1 and labels.data.max() <= n_experts
    assert (labels.data[~body] == 0).all()  # air stays see-through

    routing.expert_combo.setCurrentIndex(1)  # first expert's weight as a heatmap
    heat = routing.update_overlay()
    assert heat.name.endswith(f"{second.answer.routing.expert_names[0]} weight")
    assert heat.data.shape == ct.data.shape and heat.data.dtype == np.float32
    np.testing.assert_allclose(heat.translate, ct.translate)
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
    # de-identified SR (issue 19): a pseudonymous patient in a pseudonymous study, source UIDs remapped
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

    assert chat._generation_done.is_set()  # the generation thread ended with the window
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
