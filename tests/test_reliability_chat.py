"""The running chat: what a user does while the model works must not break the viewer.

Stop during generation and closing the viewer mid-answer are held by tests/test_chat.py; here:
closing during the model load, switching or removing the CT layer mid-answer, a full disk
while exporting, and a non-CT layer. Each asserts the viewer still works and no thread is left.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import QThreadPool

from napari_tghmoe._widgets.chat import ChatWidget
from napari_tghmoe._widgets.routing_view import RoutingView
from napari_tghmoe.io import CTVolume
from napari_tghmoe.layers import ct_layer_kwargs


def _ct_volume(shape=(12, 48, 40), modality="CT") -> CTVolume:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.where((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (shape[2] / 2.5) ** 2, 40, -1000)
    hu = (hu + 30 * np.sin(z)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(2.5, 0.8, 0.7), description=f"{modality} TEST", modality=modality)


@pytest.fixture
def make_chat(tmp_path, tiny_tghmoe_folder):
    created = []

    def make(viewer, *, max_new_tokens=6):
        chat = ChatWidget(
            viewer,
            transcript_path=tmp_path / "transcript.jsonl",
            settings_file=tmp_path / "settings.json",
            model_path=tiny_tghmoe_folder,
            device_choice="CPU",
            max_new_tokens=max_new_tokens,
        )
        viewer.window.add_dock_widget(chat, name="Chat", area="right")
        created.append(chat)
        return chat

    yield make
    for chat in created:
        chat.shutdown()


def _no_worker_left(timeout_ms: int = 60_000) -> bool:
    """Every napari worker (model load, generation) has ended: a guard against hangs, not a timing."""
    return QThreadPool.globalInstance().waitForDone(timeout_ms)


def _stream_a_few_tokens(qtbot, chat, question="Describe everything in detail."):
    streamed = []
    chat.text_streamed.connect(lambda *_: streamed.append(1))
    assert chat.send(question)
    qtbot.waitUntil(lambda: len(streamed) > 2, timeout=60_000)


def test_closing_the_viewer_during_the_model_load_leaves_no_thread(make_napari_viewer, make_chat, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    chat = make_chat(viewer)
    assert chat.send("Is there a liver lesion?")
    assert chat._load_worker is not None and chat._gen_worker is None  # still loading

    viewer.close()

    assert _no_worker_left()
    assert chat._gen_worker is None and not chat.records  # the load ended; no answer was started
    saved = chat.transcript.turns[-1]
    assert saved.role == "assistant" and saved.text.endswith("[viewer closed]")


@pytest.mark.parametrize("action", ["switch", "remove"])
def test_switching_or_removing_the_ct_layer_mid_answer(make_napari_viewer, make_chat, qtbot, action):
    viewer = make_napari_viewer()
    volume = _ct_volume()
    layer = viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    chat = make_chat(viewer, max_new_tokens=40)
    routing = RoutingView(viewer)  # the routing dock draws the answer's overlay on the CT: it must cope too
    viewer.window.add_dock_widget(routing, name="Routing", area="right")
    _stream_a_few_tokens(qtbot, chat)

    if action == "switch":
        other = viewer.add_image(np.zeros((6, 20, 20), np.float32), name="other")
        viewer.layers.selection.active = other
    else:
        viewer.layers.remove(layer)
    qtbot.waitUntil(lambda: not chat.is_busy, timeout=60_000)

    assert chat.conversation.generation_done.is_set() and _no_worker_left()
    record = chat.latest_record()
    assert record is not None and record.layer_name == volume.description  # answered about the CT it was asked
    assert record.volume.shape == volume.shape
    assert not [t for t in chat.transcript.turns if t.role == "error"]
    qtbot.waitUntil(lambda: routing.rendered_turn == record.turn_id, timeout=30_000)
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))  # and the dock goes on working
    assert chat.send("Is there a liver lesion?")
    qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=60_000)
    assert len(chat.records) == 2
    assert _no_worker_left()  # the routing dock's workers too, before the viewer goes


def test_a_full_disk_while_exporting_leaves_no_half_written_file(make_napari_viewer, make_chat, qtbot, tmp_path,
                                                                 monkeypatch):
    import pydicom
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    viewer.add_image(_ct_volume().hu, **ct_layer_kwargs(_ct_volume()))
    chat = make_chat(viewer)
    assert chat.send("Generate a radiology report.")
    qtbot.waitUntil(lambda: not chat.is_busy and chat._load_worker is None, timeout=60_000)
    assert chat.latest_record() is not None

    real_write_text, real_save_as = Path.write_text, pydicom.Dataset.save_as

    def full_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    def full_dicom(self, filename, *args, **kwargs):
        real_save_as(self, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(Path, "write_text", full_text)
    monkeypatch.setattr(pydicom.Dataset, "save_as", full_dicom)
    out = tmp_path / "exports"
    out.mkdir()
    for name in ("report.txt", "report.json", "report.dcm"):
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, n=name, **k: (str(out / n), ""))
        chat._export_dialog()  # the dock's Export button
        assert "Export failed" in chat.transcript_texts()[-1] and "No space left" in chat.transcript_texts()[-1]
    assert list(out.iterdir()) == []  # no report, no temp file
    assert chat.send_button.isEnabled()


def test_a_non_ct_layer_is_refused_naming_the_modality(make_napari_viewer, make_chat, qtbot):
    viewer = make_napari_viewer()
    mr = _ct_volume(modality="MR")
    viewer.add_image(mr.hu, **ct_layer_kwargs(mr))
    chat = make_chat(viewer)
    assert not chat.send("Is there a lesion?")
    assert "modality is MR, not CT" in chat.transcript_texts()[-1]
    assert chat._load_worker is None and not chat.is_busy  # nothing started
