"""The conversation controller without Qt: no viewer, no qtbot, only the tiny (or demo) model."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

from napari_tghmoe.conversation import (
    PLACEHOLDER_NOTE,
    STOPPED_NOTE,
    Conversation,
    ModelChoice,
    ModelLoadFailed,
    Question,
    QuestionRefused,
    default_model_path,
    load_engine,
)
from napari_tghmoe.io import CTVolume, load_volume, write_dicom_series


def _ct_volume(shape=(12, 48, 40), modality="CT") -> CTVolume:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.where((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (shape[2] / 2.5) ** 2, 40, -1000)
    hu = (hu + 30 * np.sin(z)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(2.5, 0.8, 0.7), origin=(-20.0, -30.0, 100.0), description="CT ABDOMEN",
                    modality=modality)


@pytest.fixture
def conversation(tmp_path, tiny_tghmoe_folder):
    """A conversation on the tiny model (CPU), autosaving to a file under ``tmp_path``."""
    return Conversation(tmp_path / "transcript.jsonl", model=ModelChoice(tiny_tghmoe_folder, "CPU"), max_new_tokens=6)


def _record_signals(conversation: Conversation) -> dict[str, list]:
    seen: dict[str, list] = {"added": [], "changed": [], "recorded": [], "selected": [], "cleared": []}
    conversation.turn_added.connect(seen["added"].append)
    conversation.turn_changed.connect(seen["changed"].append)
    conversation.answer_recorded.connect(seen["recorded"].append)
    conversation.answer_selected.connect(seen["selected"].append)
    conversation.cleared.connect(lambda: seen["cleared"].append(True))
    return seen


def test_the_module_imports_no_qt_napari_or_torch():
    code = (
        "import sys, napari_tghmoe.conversation\n"
        "heavy = [m for m in ('qtpy', 'napari', 'torch', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ask_streams_tokens_and_records_the_turns_and_the_answer(conversation, tmp_path):
    seen = _record_signals(conversation)
    chunks: list[str] = []
    volume = _ct_volume()

    record = conversation.ask(Question("Is there a liver lesion?", volume, layer_name="CT"), on_token=chunks.append)

    assert record is not None and record.answer.text
    assert len(chunks) >= 2, "text should arrive in several chunks"
    assert "".join(chunks).strip() == record.answer.text
    question, answer = conversation.turns
    assert (question.role, question.text, question.meta["layer"]) == ("user", "Is there a liver lesion?", "CT")
    assert answer.role == "assistant" and answer.text == record.answer.text
    assert answer.meta["report"]["answer"] == record.answer.text and answer.meta["stopped"] is False
    assert record.turn_id == answer.id and record.volume is volume and record.layer_name == "CT"
    assert conversation.records == {answer.id: record}
    assert conversation.latest_record() is record and conversation.selected_record() is record
    assert PLACEHOLDER_NOTE in record.document.notes  # the tiny model is the untrained placeholder
    assert conversation.last_tokens_per_s and conversation.last_tokens_per_s > 0
    assert not conversation.is_answering and conversation.generation_done.is_set()
    assert [t.role for t in seen["added"]] == ["user", "assistant"]
    assert seen["recorded"] == [record] and seen["selected"] == [answer.id]

    reopened = Conversation(tmp_path / "transcript.jsonl")  # the autosaved file holds both turns
    assert [(t.role, t.text) for t in reopened.turns] == [(t.role, t.text) for t in conversation.turns]

    second = conversation.ask(Question("Generate a radiology report.", volume))
    assert second.answer.prompt_kind == "report"
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user", "assistant"]
    assert sorted(conversation.records) == [answer.id, second.turn_id] and second.turn_id > answer.id
    conversation.select_answer(answer.id)
    assert conversation.selected_record() is record and seen["selected"][-1] == answer.id


def test_stop_from_the_token_callback_ends_the_answer_early(conversation):
    conversation.max_new_tokens = 2000

    record = conversation.ask(Question("Describe the liver.", _ct_volume()), on_token=lambda _: conversation.stop())

    assert record.stopped and record.answer.stopped
    assert record.answer.timings["n_tokens"] < 50  # far from the 2000 allowed
    assert record.answer.tokens_after_stop <= 1
    assert STOPPED_NOTE in record.document.notes
    assert conversation.turns[-1].meta["stopped"] is True


def test_closing_the_stream_early_stops_the_generation_and_marks_the_turn(conversation):
    conversation.max_new_tokens = 2000
    seen = _record_signals(conversation)
    stream = conversation.stream(Question("Describe everything in detail.", _ct_volume()))
    received = [next(stream) for _ in range(3)]

    stream.close()

    assert conversation.generation_done.is_set()  # the generation thread has ended
    assert not conversation.is_answering and not conversation.records
    last = conversation.turns[-1]
    assert last.role == "assistant" and last.text == "".join(received) + " [stopped]"
    assert seen["changed"] == [last]


def test_the_dock_flow_runs_the_generation_on_a_worker_thread(conversation):
    """begin -> answer_stream on a worker -> add_text / finish here: what the Qt view does."""
    conversation.load_model()
    pending = conversation.begin(Question("Which organ shows an abnormality in this scan?", _ct_volume()))
    assert conversation.is_answering and pending.turn.role == "assistant"
    with pytest.raises(QuestionRefused, match="still answering"):
        conversation.begin(Question("And another?", _ct_volume()))
    chunks = conversation.answer_stream()
    assert not conversation.generation_done.is_set()
    items: queue.Queue = queue.Queue()

    def run() -> None:
        for item in chunks:
            items.put(item)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)

    assert not worker.is_alive() and conversation.generation_done.is_set()
    texts = []
    while True:
        item = items.get_nowait()
        if not isinstance(item, str):
            break
        texts.append(conversation.add_text(item))
    assert texts and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # grows chunk by chunk
    record = conversation.finish(item)
    assert record.answer.text == texts[-1].strip() and not conversation.is_answering
    assert conversation.abandon() is None  # nothing left to abandon


def test_a_bad_model_folder_is_an_error_naming_the_folder_and_the_next_choice_works(
    conversation, tmp_path, tiny_tghmoe_folder
):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "readme.txt").write_text("nothing here")
    conversation.choose_model(ModelChoice(bad, "CPU"))

    with pytest.raises(ModelLoadFailed, match="not-a-model") as caught:
        conversation.ask(Question("Is there a liver lesion?", _ct_volume()))

    assert caught.value.folder == str(bad) and "config.json" in caught.value.reason
    user, answer, error = conversation.turns
    assert answer.text == "[no answer]" and not conversation.is_answering
    assert error.role == "error" and "not-a-model" in error.text and str(caught.value) == error.text
    assert conversation.engine is None and not conversation.records
    with pytest.raises(ModelLoadFailed, match="missing-folder"):
        load_engine(ModelChoice(tmp_path / "missing-folder", "CPU"))

    conversation.load_model(ModelChoice(tiny_tghmoe_folder, "CPU"))
    assert conversation.engine_ready
    assert conversation.ask(Question("Is there a liver lesion?", _ct_volume())).answer.text


def test_choosing_another_model_drops_the_engine_and_a_stale_load_is_not_adopted(conversation, tiny_tghmoe_folder):
    engine = conversation.load_model()
    tiny_on_cpu = conversation.model
    assert conversation.choose_model(ModelChoice(tiny_tghmoe_folder, "CPU")) is False  # same choice: kept
    assert conversation.engine is engine

    other = ModelChoice(tiny_tghmoe_folder, "CUDA 4-bit")
    assert conversation.choose_model(other) is True
    assert conversation.engine is None and not conversation.engine_ready
    assert conversation.adopt_engine(engine, tiny_on_cpu) is False  # loaded for a choice no longer wanted
    assert conversation.engine is None
    conversation.choose_model(tiny_on_cpu)
    assert conversation.adopt_engine(engine, tiny_on_cpu) and conversation.engine_ready


def test_refused_questions_add_no_turn(conversation):
    with pytest.raises(QuestionRefused, match="MR TEST: modality is MR, not CT"):
        conversation.begin(Question("Is there a lesion?", _ct_volume(modality="MR"), layer_name="MR TEST"))
    with pytest.raises(QuestionRefused, match="empty"):
        conversation.begin(Question("   ", _ct_volume()))
    assert conversation.turns == [] and not conversation.is_answering and conversation.engine is None


def test_export_writes_every_format_without_the_patient_and_the_transcript(conversation, tmp_path, monkeypatch):
    monkeypatch.setenv("TGHMOE_DEID_SECRET", str(tmp_path / "deid-secret"))  # not the user's key
    write_dicom_series(_ct_volume(), tmp_path / "dicom", patient_name="Doe^Jane", patient_id="MRN-4711")
    volume = load_volume(tmp_path / "dicom")
    with pytest.raises(ValueError, match="no answer"):
        conversation.export_answer(tmp_path / "early.txt")
    record = conversation.ask(Question("Generate a radiology report.", volume))

    written = [conversation.export_answer(tmp_path / f"out{suffix}") for suffix in (".txt", ".md", ".json", ".dcm")]

    for path in written:
        data = path.read_bytes()
        assert data and b"Doe" not in data and b"MRN-4711" not in data, path
    assert json.loads(written[2].read_text())["answer"] == record.answer.text
    assert written[1].read_text().startswith("# CT report")
    with pytest.raises(FileExistsError):
        conversation.export_answer(written[0])
    import pydicom

    named = pydicom.dcmread(conversation.export_answer(tmp_path / "named.dcm", include_identifiers=True))
    assert str(named.PatientName) == "Doe^Jane"

    text = conversation.export_transcript(tmp_path / "chat.txt").read_text()
    assert "user: Generate a radiology report." in text and f"assistant: {record.answer.text}" in text
    with pytest.raises(FileExistsError):
        conversation.export_transcript(tmp_path / "chat.txt")
    assert conversation.export_transcript(tmp_path / "chat.txt", overwrite=True).read_text() == text


def test_new_conversation_forgets_turns_and_answers(conversation, tmp_path):
    seen = _record_signals(conversation)
    conversation.ask(Question("Is there a liver lesion?", _ct_volume()))
    conversation.begin(Question("And the spleen?", _ct_volume()))
    with pytest.raises(QuestionRefused, match="Stop the running answer"):
        conversation.new_conversation()
    conversation.abandon()

    conversation.new_conversation()

    assert conversation.turns == [] and conversation.records == {} and conversation.selected_record() is None
    assert seen["cleared"] == [True] and seen["selected"][-1] == -1
    assert Conversation(tmp_path / "transcript.jsonl").turns == []  # the file is emptied too


def test_the_bundled_demo_model_is_the_default_and_answers():
    demo = default_model_path()
    assert demo is not None, "the demo model ships with the package (resources/demo-model)"
    conversation = Conversation(max_new_tokens=4)  # memory-only transcript

    conversation.load_model(ModelChoice.default(device="CPU"))

    assert conversation.model.path == str(demo) and not conversation.model_is_placeholder
    record = conversation.ask(Question("In which plane is this CT scan acquired?", _ct_volume()))
    assert record.answer.text and record.answer.timings["n_tokens"] <= 4
    assert PLACEHOLDER_NOTE not in record.document.notes
    assert conversation.transcript.path is None
