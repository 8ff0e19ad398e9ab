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
        "import sys, napari_tghmoe.conversation, napari_tghmoe.regions, napari_tghmoe.finding_links\n"
        "napari_tghmoe.finding_links.stated_findings('There is a 9 mm renal cyst in the left kidney.')\n"
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


# --------------------------------------------------------------------------- conversations, regions, finding places


def _scripted(monkeypatch, conversation: Conversation, texts: list[str]) -> list[str]:
    """Load the model and script its answers; returns the list the rendered prompts go to."""
    from conftest import script_engine_answers

    return script_engine_answers(monkeypatch, conversation.load_model(), texts)[0]


def test_a_follow_up_carries_the_earlier_turns_and_a_new_conversation_does_not(conversation, monkeypatch, tmp_path):
    prompts = _scripted(monkeypatch, conversation, ["The liver is normal.", "The spleen is enlarged.", "No."])
    volume = _ct_volume()

    first = conversation.ask(Question("Is the liver normal?", volume, layer_name="CT"))
    second = conversation.ask(Question("And the spleen?", volume, layer_name="CT"))

    assert "Is the liver normal?" not in prompts[0].split("<|vision_start|>")[0]  # a first question stands alone
    before_video = prompts[1].split("<|vision_start|>")[0]
    assert "Is the liver normal?" in before_video and "The liver is normal." in before_video
    assert prompts[1].rstrip().endswith("And the spleen?<|im_end|>\n<|im_start|>assistant".rstrip())
    assert [c.turn_id for c in second.context] == [first.turn_id] and second.answer.history_used == 1
    assert second.document.context == [{"turn": first.turn_id, "question": "Is the liver normal?",
                                        "answer": "The liver is normal."}]
    exported = json.loads(conversation.export_answer(tmp_path / "second.json").read_text())
    assert exported["context"][0]["answer"] == "The liver is normal."
    assert "context: 1 earlier turn" in conversation.export_transcript(tmp_path / "chat.txt").read_text()

    conversation.new_conversation()
    conversation.ask(Question("And the spleen?", volume, layer_name="CT"))

    assert "Is the liver normal?" not in prompts[2] and "The liver is normal." not in prompts[2]
    assert "The spleen is enlarged." not in prompts[2]


def test_context_is_the_last_n_turns_and_the_oldest_go_when_the_model_is_full(conversation, monkeypatch):
    answers = [f"Answer number {i}." for i in range(1, 5)]
    prompts = _scripted(monkeypatch, conversation, list(answers) + ["x"] * 3)
    volume = _ct_volume()
    conversation.context_limit = 2
    for i in range(1, 5):
        conversation.ask(Question(f"Question number {i}?", volume))

    last = prompts[3]
    assert "Question number 1?" not in last and "Answer number 1." not in last
    assert "Question number 2?" in last and "Answer number 3." in last  # the last two, oldest first
    assert last.index("Question number 2?") < last.index("Question number 3?") < last.index("Question number 4?")

    conversation.context_limit = 0  # every question stands alone
    conversation.ask(Question("Question number 5?", volume))
    assert "Answer number 4." not in prompts[4]

    # a model whose context holds the prompt and one earlier turn but not two: the oldest go
    conversation.context_limit = 3
    fifth = conversation.latest_record()
    one_turn = conversation.engine.prompts.build_inputs("Question number 6?", 64, history=[("Question number 5?", "x")])
    window = one_turn.input_ids.shape[1] + conversation.max_new_tokens
    monkeypatch.setattr("napari_tghmoe.engine.context_length", lambda config: window)

    follow_up = conversation.ask(Question("Question number 6?", volume))

    assert follow_up.answer.history_used == 1 and [c.turn_id for c in follow_up.context] == [fifth.turn_id]
    assert "Question number 5?" in prompts[5] and "Question number 4?" not in prompts[5]
    assert conversation.turns[-1].role == "info" and "last 1 earlier turn fit the model's context" in conversation.turns[-1].text


def test_a_question_about_another_scan_starts_fresh_context(conversation, monkeypatch):
    prompts = _scripted(monkeypatch, conversation, ["First answer.", "Second answer.", "Third answer."])
    chest, abdomen = _ct_volume(), _ct_volume(shape=(10, 40, 40))
    conversation.ask(Question("Is the liver normal?", chest, layer_name="chest"))

    other = conversation.ask(Question("Is the liver normal?", abdomen, layer_name="abdomen"))

    assert "First answer." not in prompts[1] and other.context == []
    note = conversation.turns[2]
    assert note.role == "info" and "New scan (abdomen)" in note.text and "not used as context" in note.text
    third = conversation.ask(Question("And the kidneys?", abdomen, layer_name="abdomen"))
    assert "Second answer." in prompts[2] and "First answer." not in prompts[2]
    assert [c.turn_id for c in third.context] == [other.turn_id]


def test_a_single_question_prompt_is_the_one_it_always_was(tiny_tghmoe_folder):
    from napari_tghmoe.engine import InferenceEngine

    engine = InferenceEngine.from_pretrained(tiny_tghmoe_folder, device="cpu")
    alone = engine.build_inputs("Is there a nodule?", 64)
    empty_history = engine.prompts.build_inputs("Is there a nodule?", 64, history=[], max_length=10)
    assert alone.prompt_text == "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Is there a nodule?<|im_end|>\n<|im_start|>assistant\n"
    assert alone.input_ids.tolist() == empty_history.input_ids.tolist()
    with_history = engine.prompts.build_inputs("Is there a nodule?", 64, history=[("Q?", "A <|video_pad|> B")])
    assert with_history.input_ids[0].tolist().count(engine.model.config.video_token_id) == 64  # no smuggled video
    guided = [i for i, keep in zip(with_history.input_ids[0].tolist(), with_history.text_guidance_mask[0].tolist()) if keep]
    assert engine.tokenizer.decode(guided) == "Is there a nodule?"  # the router reads the current question only
    fit = engine.prompts.build_inputs("Q?", 64, history=[("old " * 50, "a"), ("new?", "b")], max_length=alone.input_ids.shape[1] + 20)
    assert fit.history_used == 1 and "old" not in fit.prompt_text and "new?" in fit.prompt_text


def test_a_region_question_sends_the_crop_with_its_coordinates(conversation, monkeypatch, tmp_path):
    from napari_tghmoe.regions import Region, region_context

    volume = _ct_volume(shape=(12, 48, 40))
    region = Region.from_voxels("box", [[6, 10, 8], [6, 29, 27]], volume.shape, "axial")
    marked = region_context(volume, region)
    engine = conversation.load_model()
    shown_to_model = []
    real_prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda v, s=None: shown_to_model.append(v) or real_prepare(v, s))
    question = Question("What is this?", marked.crop, layer_name="CT", scan=volume, box=marked.box, region=region,
                        region_info=marked.to_dict(volume), model_text=marked.question_for_model("What is this?"))

    record = conversation.ask(question)

    assert region.box == ((6, 7), (10, 30), (8, 28))
    assert marked.box == ((2, 11), (0, 42), (0, 40))  # 10 mm more on every side: 4 slices, 12 and 14 pixels
    assert shown_to_model[0].shape == (9, 42, 40) and np.array_equal(shown_to_model[0].hu, volume.hu[2:11, 0:42, 0:40])
    assert record.volume.shape == (9, 42, 40) and record.box == marked.box and record.scan is volume
    sent = record.answer.question
    assert "voxels z 6, y 10-29, x 8-27" in sent and "box on axial" in sent and sent.endswith("What is this?")
    corner = volume.index_to_patient((6.0, 10.0, 8.0))
    assert f"{corner[0]:.1f}" in sent and " mm" in sent  # the region in patient mm too
    assert np.allclose(shown_to_model[0].index_to_patient((0, 0, 0)), volume.index_to_patient((2, 0, 0)))
    report = json.loads(conversation.export_answer(tmp_path / "region.json").read_text())
    assert report["region"]["voxel_start_zyx"] == [6, 10, 8] and report["region"]["input_box_zyx"] == [[2, 11], [0, 42], [0, 40]]
    transcript = conversation.export_transcript(tmp_path / "chat.txt").read_text()
    assert "user: What is this?\n    region: box on axial, voxels z 6, y 10-29, x 8-27\n" in transcript


def _seg_finding(kind, voxel, location, probability=0.9):
    from napari_tghmoe.med3d.types import SegFinding

    return SegFinding(kind=kind, label=1, voxel_zyx=voxel, position_mm=tuple(float(v) for v in voxel[::-1]),
                      volume_ml=0.5, probability=probability, location=location)


def test_stated_findings_match_segmented_ones_by_kind_and_side():
    from napari_tghmoe.finding_links import locate_findings, stated_findings

    segmented = [
        _seg_finding("renal cyst", (5, 20, 30), "right kidney", 0.95),
        _seg_finding("renal cyst", (6, 22, 10), "left kidney", 0.6),
        _seg_finding("lung nodule", (2, 10, 10), "left upper lobe", 0.9),
    ]
    text = ("Kidneys: There is a 12 mm renal cyst in the left kidney, lower pole. No lung nodule.\n"
            "IMPRESSION: 12 mm renal cyst in the left kidney, lower pole.")
    stated = stated_findings(text)
    assert [(f.kind, f.location) for f in stated] == [("renal cyst", "left kidney, lower pole")] * 2
    assert text[stated[0].start:stated[0].end] == "renal cyst in the left kidney, lower pole"
    placed = locate_findings(stated, segmented)
    assert [p.voxel_zyx for p in placed] == [(6, 22, 10), (6, 22, 10)]  # the left one, named twice, one place
    assert placed[0].segmented_location == "left kidney"

    anywhere = locate_findings(stated_findings("B. renal cyst"), segmented)
    assert anywhere[0].voxel_zyx == (5, 20, 30)  # no place stated: the most probable
    in_box = locate_findings(stated_findings("A renal cyst."), segmented, prefer_box=((0, 12), (15, 30), (0, 20)))
    assert in_box[0].voxel_zyx == (6, 22, 10)  # a region question: the one inside the region
    assert locate_findings(stated_findings("There is a 6 mm lung nodule in the right upper lobe."), segmented) == [None]
    assert locate_findings(stated_findings("A hypodense splenic lesion."), segmented) == [None]
    assert stated_findings("No renal cyst; the kidneys are without lesions.") == []
    where = stated_findings("left kidney, lower pole", question="Where is the renal cyst located?")
    assert [(f.kind, f.location) for f in where] == [("renal cyst", "left kidney, lower pole")]


def test_stated_findings_get_places_from_the_segmenter_and_the_export_carries_them(conversation, monkeypatch, tmp_path):
    from napari_tghmoe.med3d.types import SegmentationResult

    volume = _ct_volume()
    result = SegmentationResult(
        labels=np.zeros(volume.shape, np.uint8), label_names={0: "background"},
        findings=[_seg_finding("renal cyst", (5, 20, 30), "left kidney")], structure_volumes_ml={},
        finding_presence={}, model_name="stand-in", seconds=0.0,
    )
    calls = []
    conversation.segmenter = lambda scan: calls.append(scan) or result
    _scripted(monkeypatch, conversation, ["There is a 9 mm renal cyst in the left kidney, upper pole.",
                                          "It is a renal cyst.", "A hypodense splenic lesion."])
    located = []
    conversation.findings_located.connect(located.append)

    record = conversation.ask(Question("Generate a radiology report.", volume, layer_name="CT"))

    assert calls == [volume] and located == [record]
    link = record.finding_links[0]
    assert (link.kind, link.location, link.voxel_zyx) == ("renal cyst", "left kidney, upper pole", (5, 20, 30))
    report = json.loads(conversation.export_answer(tmp_path / "report.json").read_text())
    assert report["located_findings"] == [{
        "kind": "renal cyst", "location": "left kidney, upper pole", "voxel_zyx": [5, 20, 30],
        "position_mm": [30.0, 20.0, 5.0], "segmented_location": "left kidney", "probability": 0.9, "volume_ml": 0.5,
    }]
    assert "finding: renal cyst (left kidney, upper pole) at voxel (z, y, x) 5, 20, 30" in (
        conversation.export_transcript(tmp_path / "chat.txt").read_text())

    again = conversation.ask(Question("What is it?", volume, layer_name="CT"))  # the scan's segmentation is kept
    assert calls == [volume] and again.finding_links[0].voxel_zyx == (5, 20, 30)

    unmatched = conversation.ask(Question("Anything in the spleen?", volume, layer_name="CT"))
    assert unmatched.stated and unmatched.finding_links == [] and unmatched.locations_checked
    assert "located_findings" not in json.loads(conversation.export_answer(tmp_path / "none.json").read_text())


def test_a_failing_segmenter_leaves_the_answer_without_places(conversation, monkeypatch):
    def broken(scan):
        raise RuntimeError("no segmentation model here\nmore")

    conversation.segmenter = broken
    _scripted(monkeypatch, conversation, ["There is a 9 mm renal cyst in the left kidney, upper pole."])

    record = conversation.ask(Question("Generate a radiology report.", _ct_volume()))

    assert record.answer.text.startswith("There is") and record.finding_links == []
    assert record.locations_note == "segmentation failed: no segmentation model here"
    assert conversation.turns[-1].meta["stated_findings"] == [{"kind": "renal cyst", "location": "left kidney, upper pole"}]
