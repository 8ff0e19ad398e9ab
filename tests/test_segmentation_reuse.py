"""One segmentation per scan between the chat model's evidence reader and the finding links.

A model with an "evidence" volume encoder (``EvidenceReader``) segments the CT to read it; the
chat places the findings an answer states with a segmentation of the scan too. These tests hold
that a report and its finding links cost one ``segment_volume`` call, that a segmentation the
Segment dock made with the model's own cascade is the evidence (no call), and that one made with
another model is not (the reader segments the scan itself).

The chat model is the tiny TGH-MoE with the bundled demo model's cascade copy
(``resources/demo-model/volume_encoder``) attached as its evidence reader, so the reader's folder
and the finding links' default folder (``resources/demo-seg-model``) are two folders holding the
same networks, as in the shipped demo. Where a real cascade run would be too slow,
``segment_volume`` is replaced by a counting stand-in; the last tests run the real cascade on a
small phantom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_tghmoe._resources import resource_path
from napari_tghmoe.conversation import REPORT_REQUEST, Conversation, ModelChoice, Question
from napari_tghmoe.med3d import segment
from napari_tghmoe.med3d.types import SegFinding, SegmentationResult

from conftest import script_engine_answers

DEMO_SEG = resource_path("demo-seg-model")
MODEL_CASCADE = resource_path("demo-model", "volume_encoder")
NODULE_VOXEL = (3, 6, 9)
REPORT = "There is a 9 mm lung nodule in the left upper lobe."


@pytest.fixture(scope="module")
def evidence_engine():
    """The tiny TGH-MoE reading the CT through the demo model's cascade (an ``EvidenceReader``)."""
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model import volume_tokens
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    model = adapt_2d_mllm(build_tiny_base_model(seed=0, vocab_size=512), {"volume_grid": [8, 64, 64], "moe_blocks": [2, 3]})
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    volume_tokens.attach_volume_encoder(model, MODEL_CASCADE, tokenizer, source="evidence")
    assert isinstance(model.volume_encoder, volume_tokens.EvidenceReader)
    return InferenceEngine(model.eval(), tokenizer)


@pytest.fixture(scope="module")
def other_cascade(tmp_path_factory):
    """A cascade with other networks (tiny random ones) than the chat model's."""
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model

    root = tmp_path_factory.mktemp("other-cascade")
    organs = build_tiny_seg_model(root / "organs")
    finder = build_tiny_seg_model(root / "finder", organ_names=[], working_spacing=[4.0, 4.0, 4.0])
    return segment.attach_finding_model(organs, finder, root / "other-seg-model")


def _small_ct(seed: int = 0):
    """A small chest phantom: one finding-model window, so the real cascade runs in seconds."""
    from napari_tghmoe.phantom import make_phantom

    return make_phantom(seed, "chest", shape=(8, 16, 16), spacing=(8.0, 4.0, 4.0)).volume


def _result(volume, folder) -> SegmentationResult:
    """What ``segment_volume(volume, folder)`` returns, as far as these tests read it."""
    finding = SegFinding(kind="lung nodule", label=14, voxel_zyx=NODULE_VOXEL, position_mm=(36.0, 24.0, 24.0),
                         volume_ml=0.5, probability=0.9, location="left upper lobe", verifier_probability=0.95)
    return SegmentationResult(
        labels=np.zeros(volume.shape, np.uint8), label_names={0: "background", 14: "lung nodule"},
        findings=[finding], structure_volumes_ml={}, finding_presence={"lung nodule": 0.9},
        model_name=segment._resolve_model_dir(folder).name, seconds=0.0,
    )


@pytest.fixture
def seg_calls(monkeypatch):
    """Replace ``segment_volume`` (wherever it is looked up) by a stand-in that records the folder
    of every call (None: the default, the bundled demo cascade)."""
    import napari_tghmoe.med3d as med3d

    calls: list = []

    def counting(volume, model_dir=None, **_):
        calls.append(Path(model_dir) if model_dir is not None else None)
        return _result(volume, model_dir)

    monkeypatch.setattr(segment, "segment_volume", counting)
    monkeypatch.setattr(med3d, "segment_volume", counting)
    return calls


def _conversation(engine, monkeypatch, texts, **options) -> Conversation:
    """A conversation on ``engine`` (its answers' texts scripted) whose finding links use the
    chat dock's segmenter: ``segment_volume(scan, segmenter_folder)``, looked up at call time."""
    conversation = Conversation(None, max_new_tokens=4, **options)
    choice = ModelChoice("tiny-evidence-model", "CPU")
    assert conversation.adopt_engine(engine, choice)
    conversation.segmenter = lambda scan: segment.segment_volume(scan, conversation.segmenter_folder)
    script_engine_answers(monkeypatch, engine, list(texts))
    return conversation


def _reader(engine):
    return engine.model.volume_encoder


# ---------------------------------------------------------------------------- (a) one per report


def test_a_report_and_its_finding_links_segment_the_scan_once(evidence_engine, monkeypatch, seg_calls):
    volume = _small_ct(1)
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT, "Yes, in the left upper lobe."])

    record = conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert seg_calls == [MODEL_CASCADE]  # the evidence reader's run, and no second one for the links
    assert [(f.kind, f.voxel_zyx) for f in record.finding_links] == [("lung nodule", NODULE_VOXEL)]
    shared = _reader(evidence_engine).segmentation(volume)
    assert shared is not None and conversation.known_segmentation(volume) is shared
    assert conversation.known_segmentation_folder(volume) == MODEL_CASCADE

    follow_up = conversation.ask(Question("Is there a lung nodule?", volume, layer_name="CT"))
    assert seg_calls == [MODEL_CASCADE] and follow_up.finding_links[0].voxel_zyx == NODULE_VOXEL


def test_the_links_segment_with_their_own_model_when_it_is_not_the_readers_cascade(
    evidence_engine, monkeypatch, seg_calls, other_cascade
):
    volume = _small_ct(2)
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT], segmenter_folder=other_cascade)

    record = conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert seg_calls == [MODEL_CASCADE, Path(other_cascade)]  # the evidence, then the chosen segmenter
    assert conversation.known_segmentation(volume).model_name == Path(other_cascade).name
    assert record.finding_links[0].voxel_zyx == NODULE_VOXEL


def test_a_slab_question_does_not_lend_its_segmentation_to_the_whole_scan(evidence_engine, monkeypatch, seg_calls):
    volume = _small_ct(3)
    slab = type(volume)(hu=volume.hu[2:6], spacing=volume.spacing, modality="CT")
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT])

    record = conversation.ask(Question("What is on this slice?", slab, layer_name="CT", scan=volume,
                                       box=((2, 6), (0, 16), (0, 16))))

    # the model segmented the slab; the links need the whole scan, segmented on its own grid
    assert seg_calls == [MODEL_CASCADE, None]
    assert conversation.known_segmentation(volume).labels.shape == volume.shape
    assert record.locations_checked


# ---------------------------------------------------------------------------- (b) and (c) the other way


def test_a_segment_dock_result_of_the_same_cascade_is_the_evidence(evidence_engine, monkeypatch, seg_calls):
    volume = _small_ct(4)
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT])
    docked = segment.segment_volume(volume, None)  # what the Segment dock runs with its default model
    conversation.remember_segmentation(volume, docked, DEMO_SEG)  # (the chat dock tells it before asking)
    assert seg_calls == [None]

    record = conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert seg_calls == [None]  # neither the evidence reader nor the finding links segmented again
    assert _reader(evidence_engine).segmentation(volume) is docked
    assert record.finding_links[0].voxel_zyx == NODULE_VOXEL
    words = evidence_engine.model.volume_words(volume)
    assert "lung nodule" in words, words  # the evidence is what the Segment dock found


def test_a_segmentation_by_another_model_is_not_the_evidence(evidence_engine, monkeypatch, seg_calls, other_cascade):
    volume = _small_ct(5)
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT])
    foreign = segment.segment_volume(volume, other_cascade)
    conversation.remember_segmentation(volume, foreign, other_cascade)

    record = conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert seg_calls == [Path(other_cascade), MODEL_CASCADE]  # the reader read the scan with its own cascade
    own = _reader(evidence_engine).segmentation(volume)
    assert own is not foreign and own.model_name == MODEL_CASCADE.name
    assert conversation.known_segmentation(volume) is foreign  # the links still use the remembered one
    assert record.finding_links[0].voxel_zyx == NODULE_VOXEL


def test_a_segmentation_of_unknown_or_mislabelled_origin_is_not_the_evidence(evidence_engine, seg_calls):
    reader = _reader(evidence_engine)
    volume = _small_ct(6)
    result = _result(volume, None)  # says "demo-seg-model"

    assert not evidence_engine.remember_segmentation(volume, result, None)  # origin not known
    assert not evidence_engine.remember_segmentation(volume, _result(volume, MODEL_CASCADE), DEMO_SEG)  # names another
    wrong_grid = _result(type(volume)(hu=volume.hu[:4], spacing=volume.spacing, modality="CT"), None)
    assert not evidence_engine.remember_segmentation(volume, wrong_grid, DEMO_SEG)
    assert reader.segmentation(volume) is None and seg_calls == []

    assert evidence_engine.remember_segmentation(volume, result, DEMO_SEG)  # same networks, another folder
    reader.evidence(volume)
    assert seg_calls == [] and reader.segmentation(volume) is result


def test_same_cascade_compares_the_networks_not_the_folder(evidence_engine, other_cascade, tmp_path):
    import shutil

    reader = _reader(evidence_engine)
    assert reader.same_cascade(None) and reader.same_cascade(DEMO_SEG) and reader.same_cascade(MODEL_CASCADE)
    assert not reader.same_cascade(other_cascade)
    copy = tmp_path / "copy"
    shutil.copytree(DEMO_SEG, copy)
    assert reader.same_cascade(copy)
    weights = copy / "findings" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the finding model's weights
    weights.write_bytes(bytes(data))
    assert not reader.same_cascade(copy)
    assert not reader.same_cascade(tmp_path / "missing")


# ---------------------------------------------------------------------------- the real cascade


def test_the_real_cascade_segments_a_scan_once_for_the_report_and_its_links(evidence_engine, monkeypatch):
    runs = []
    real = segment.segment_volume
    monkeypatch.setattr(segment, "segment_volume", lambda *a, **k: runs.append(a[1:2]) or real(*a, **k))
    volume = _small_ct(7)
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT])

    record = conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert len(runs) == 1  # the evidence reader's; the links reuse it
    made = _reader(evidence_engine).segmentation(volume)
    assert made.model_name == MODEL_CASCADE.name and made.labels.shape == volume.shape
    assert conversation.known_segmentation(volume) is made and record.locations_checked


def test_the_real_segment_dock_result_becomes_the_evidence_it_would_have_made(evidence_engine, monkeypatch):
    from napari_tghmoe.med3d.evidence import scan_evidence

    runs = []
    real = segment.segment_volume
    monkeypatch.setattr(segment, "segment_volume", lambda *a, **k: runs.append(1) or real(*a, **k))
    volume = _small_ct(8)
    docked = segment.segment_volume(volume, None)  # the Segment dock's default: resources/demo-seg-model
    assert docked.model_name == DEMO_SEG.name and len(runs) == 1
    conversation = _conversation(evidence_engine, monkeypatch, [REPORT])
    conversation.remember_segmentation(volume, docked, DEMO_SEG)

    conversation.ask(Question(REPORT_REQUEST, volume, layer_name="CT"))

    assert len(runs) == 1
    adopted = _reader(evidence_engine).evidence(volume).to_json()
    own = scan_evidence(volume, real(volume, MODEL_CASCADE)).to_json()  # what the reader would have made itself
    assert (adopted.pop("model_name"), own.pop("model_name")) == (DEMO_SEG.name, MODEL_CASCADE.name)
    assert adopted == own


# ---------------------------------------------------------------------------- through the docks


@pytest.fixture(scope="module")
def evidence_model_folder(evidence_engine, tmp_path_factory):
    """The tiny evidence model saved as a model folder (its cascade copied beside it), for the chat dock."""
    folder = tmp_path_factory.mktemp("models") / "tiny-evidence-model"
    evidence_engine.model.save_pretrained(folder)
    evidence_engine.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("docked_with", ["demo", "other"])
def test_the_chat_dock_reads_a_segment_dock_result_of_its_cascade_as_evidence(
    make_napari_viewer, qtbot, monkeypatch, tmp_path, seg_calls, evidence_model_folder, other_cascade, docked_with
):
    from napari_tghmoe._widgets.chat import ChatWidget
    from napari_tghmoe._widgets.segment_dock import SegmentDock
    from napari_tghmoe.layers import ct_layer_kwargs

    volume = _small_ct(9)
    viewer = make_napari_viewer()
    viewer.add_image(volume.hu, **ct_layer_kwargs(volume))
    docks = []
    try:
        segment_dock = SegmentDock(viewer, model_path=DEMO_SEG if docked_with == "demo" else other_cascade)
        docks.append(segment_dock)
        assert segment_dock.segment()
        qtbot.waitUntil(lambda: not segment_dock.is_busy and segment_dock.result is not None, timeout=60_000)
        assert len(seg_calls) == 1
        chat = ChatWidget(viewer, transcript_path=tmp_path / "t.jsonl", settings_file=tmp_path / "s.json",
                          model_path=evidence_model_folder, device_choice="CPU", max_new_tokens=4)
        docks.append(chat)
        script_engine_answers(monkeypatch, chat.conversation.load_model(chat._model_choice()), [REPORT])
        reader = chat.conversation.engine.model.volume_encoder

        assert chat.send(REPORT_REQUEST)
        qtbot.waitUntil(lambda: not chat.is_busy and chat.latest_record() is not None, timeout=60_000)
        record = chat.latest_record()
        qtbot.waitUntil(lambda: not chat.is_locating and record.locations_checked, timeout=60_000)

        scan = record.whole_volume
        if docked_with == "demo":  # the same networks: the Segment dock's result is the evidence
            assert len(seg_calls) == 1 and reader.segmentation(scan) is segment_dock.result
        else:  # another model's findings are not the evidence: the reader segments with its own cascade
            assert len(seg_calls) == 2 and seg_calls[1].name == "volume_encoder"
            assert reader.segmentation(scan) is not segment_dock.result
        assert record.finding_links[0].voxel_zyx == NODULE_VOXEL  # placed with the Segment dock's result
    finally:
        for dock in docks:
            dock.shutdown()
