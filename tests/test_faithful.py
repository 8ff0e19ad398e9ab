"""Faithful report targets: a report the model is trained on states only what its evidence states."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from napari_tghmoe.eval.metrics import extract_stated_findings
from napari_tghmoe.phantom import make_phantom
from napari_tghmoe.train.faithful import faithful_report, stated_pairs


@pytest.fixture(scope="module")
def two_finding_phantom():
    """A small chest phantom with at least two findings in different sections."""
    for seed in range(40):
        phantom = make_phantom(seed=2 * seed, region="chest", shape=(16, 32, 48))
        if len({f.organ for f in phantom.findings}) >= 2:
            return phantom
    raise AssertionError("no chest phantom with findings in two organs among 40 seeds")


def _words(*findings, extra: str = "") -> str:
    found = "; ".join(f"{round(f.size_mm)} mm {f.kind} in the {f.location}" for f in findings)
    found = "; ".join(p for p in (found, extra) if p) or "nothing"
    return f"3D encoder: axial series, arterial phase. Found: {found}."


def _pairs(report: str) -> set[tuple[str, str | None]]:
    return {(s.kind, s.location) for s in extract_stated_findings(report)}


def test_the_evidence_words_are_read_like_a_report():
    words = "3D encoder: coronal series. Found: 14 mm lung nodule in the right upper lobe; 20 mm renal cyst in the left kidney, upper pole."
    assert stated_pairs(words) == {("lung nodule", "right upper lobe"), ("renal cyst", "left kidney, upper pole")}
    assert stated_pairs("3D encoder: axial series. Found: nothing.") == set()


def test_a_finding_the_words_do_not_state_leaves_its_section_and_the_impression(two_finding_phantom):
    phantom = two_finding_phantom
    kept, dropped = phantom.findings[0], phantom.findings[1]
    report = faithful_report(phantom.report, phantom.findings, _words(kept), phantom.region)
    assert _pairs(report) == {(kept.kind, kept.location)}
    assert dropped.sentence not in report and kept.sentence in report
    impression = report.split("IMPRESSION:")[1].strip().splitlines()
    assert impression == [f"1. {round(kept.size_mm)} mm {kept.kind} in the {kept.location}."]
    # every other line is the phantom's own
    assert report.split("FINDINGS:")[0] == phantom.report.split("FINDINGS:")[0]
    assert len(report.splitlines()) == len(phantom.report.splitlines()) - (len(phantom.findings) - 1)


def test_nothing_found_gives_a_normal_report_and_everything_found_the_report_itself(two_finding_phantom):
    phantom = two_finding_phantom
    normal = faithful_report(phantom.report, phantom.findings, _words(), phantom.region)
    assert _pairs(normal) == set()
    assert "1." not in normal.split("IMPRESSION:")[1] and normal.split("IMPRESSION:")[1].strip()
    for line in normal.split("FINDINGS:")[1].split("IMPRESSION:")[0].strip().splitlines():
        heading, _, text = line.partition(": ")
        assert heading and text, line  # every section still says something
    assert faithful_report(phantom.report, phantom.findings, _words(*phantom.findings), phantom.region) == phantom.report


def test_a_false_finding_of_the_evidence_is_never_added(two_finding_phantom):
    phantom = two_finding_phantom
    words = _words(*phantom.findings, extra="15 mm renal cyst in the right kidney, lower pole")
    assert faithful_report(phantom.report, phantom.findings, words, phantom.region) == phantom.report


def test_a_location_the_words_get_wrong_does_not_count_as_stated(two_finding_phantom):
    phantom = two_finding_phantom
    wrong = copy.copy(phantom.findings[0])
    wrong.location = next(loc for loc in ("left lower lobe", "right upper lobe", "left pleural space", "subcarinal region") if loc != wrong.location)
    report = faithful_report(phantom.report, phantom.findings, _words(wrong, *phantom.findings[1:]), phantom.region)
    assert (phantom.findings[0].kind, phantom.findings[0].location) not in _pairs(report)


class _Evidence:
    """What collate reads of a volume encoder: the evidence line and the volume features."""

    def __init__(self, words: str, size: int):
        self._words, self._size = words, size

    def words(self, sample):
        return self._words

    def features(self, sample):
        import torch

        return torch.zeros(2, self._size)


def test_collate_trains_on_the_faithful_report_when_the_recipe_asks(two_finding_phantom):
    from napari_tghmoe.datasets import Sample
    from napari_tghmoe.train.collate import collate
    from napari_tghmoe.model.tiny import tiny_base_config
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    phantom = two_finding_phantom
    tokenizer = build_tokenizer(list(DEFAULT_CORPUS) + [phantom.report], vocab_size=512)
    config = tiny_base_config()
    config.volume_grid = (8, 64, 64)
    config.group_names = ["shared", "report", "vqa_closed", "vqa_open"]
    config.num_volume_tokens, config.volume_token_id = 2, int(tokenizer.eos_token_id)
    hu = np.random.default_rng(0).normal(0, 100, (8, 32, 32)).astype(np.float32)
    findings = [{"kind": f.kind, "location": f.location, "size_mm": f.size_mm, "organ": f.organ} for f in phantom.findings]
    sample = Sample(hu, "Write the report.", phantom.report, "report", meta={"spacing": (5.0, 1.0, 1.0), "findings": findings, "region": "chest"})
    evidence = _Evidence(_words(phantom.findings[0]), 4)

    def target(batch):
        labels = batch["labels"][0]
        return tokenizer.decode(labels[labels != -100][:-1].tolist())

    plain = collate([sample], tokenizer, config, volume_features=evidence)
    faithful = collate([sample], tokenizer, config, volume_features=evidence, faithful_reports=True)
    assert _pairs(target(plain)) == {(f.kind, f.location) for f in phantom.findings}
    assert _pairs(target(faithful)) == {(phantom.findings[0].kind, phantom.findings[0].location)}


# --------------------------------------------------------------------------- faithful answers


def _location_meta(kind: str, answer: str, choices: list[str], region: str = "chest") -> dict:
    return {"question": f"Where is the {kind} located?", "choices": choices, "answer_text": answer, "region": region}


NODE_CHOICES = ["right paratracheal region", "subcarinal region", "left hilar region", "no enlarged lymph node is seen"]


def test_a_location_question_is_answered_as_the_words_answer_it():
    from napari_tghmoe.train.faithful import faithful_answer

    node = "3D encoder: axial series. Found: 12 mm enlarged lymph node in the subcarinal region; 9 mm lung nodule in the left lower lobe."
    nothing = "3D encoder: axial series. Found: nothing."
    # the words missed the node: the target is the absence they state, not the truth
    assert faithful_answer("location", _location_meta("enlarged lymph node", "subcarinal region", NODE_CHOICES), nothing) == "no enlarged lymph node is seen"
    # the words name a node the truth lacks: the target is the node's place
    assert faithful_answer("location", _location_meta("enlarged lymph node", "no enlarged lymph node is seen", NODE_CHOICES), node) == "subcarinal region"
    # words that agree change nothing
    assert faithful_answer("location", _location_meta("enlarged lymph node", "subcarinal region", NODE_CHOICES), node) == "subcarinal region"


def test_the_truth_stays_where_the_words_answer_nothing_among_the_choices():
    from napari_tghmoe.train.faithful import faithful_answer

    two_nodes = "3D encoder: axial series. Found: 12 mm enlarged lymph node in the subcarinal region; 11 mm enlarged lymph node in the left hilar region."
    no_absent = NODE_CHOICES[:3] + ["right pleural space"]
    meta = _location_meta("enlarged lymph node", "subcarinal region", no_absent)
    assert faithful_answer("location", meta, "3D encoder: axial series. Found: nothing.") == "subcarinal region"  # absence is no choice
    assert faithful_answer("location", _location_meta("enlarged lymph node", "left hilar region", NODE_CHOICES), two_nodes) == "left hilar region"
    words = "3D encoder: axial series, venous phase. Found: nothing."
    assert faithful_answer("phase", {"question": "Which phase?", "choices": ["arterial", "venous"], "answer_text": "arterial", "region": "chest"}, words) == "arterial"


def test_abnormality_and_organ_questions_follow_the_one_finding_the_words_state():
    from napari_tghmoe.train.faithful import faithful_answer

    words = "3D encoder: axial series. Found: 20 mm renal cyst in the left kidney, upper pole."
    abnormality = {"question": "What abnormality is seen in the abdomen?", "region": "abdomen", "answer_text": "no abnormality",
                   "choices": ["renal cyst", "no abnormality", "hypodense splenic lesion", "enlarged lymph node"]}
    organ = {"question": "Which organ contains the abnormality?", "region": "abdomen", "answer_text": "liver",
             "choices": ["liver", "kidney", "spleen", "none of these organs"]}
    assert faithful_answer("abnormality", abnormality, words) == "renal cyst"
    assert faithful_answer("organ", organ, words) == "kidney"
    two = words[:-1] + "; 30 mm hypodense liver lesion in the left lobe of the liver."
    assert faithful_answer("organ", organ, two) == "liver"  # two organs stated: the truth stays


def test_collate_trains_closed_and_open_answers_on_the_words_when_the_recipe_asks():
    from napari_tghmoe.datasets import Sample
    from napari_tghmoe.datasets.samples import closed_vqa_prompt, closed_vqa_target
    from napari_tghmoe.model.tiny import tiny_base_config
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.train.collate import collate

    question = "Where is the enlarged lymph node located?"
    tokenizer = build_tokenizer(list(DEFAULT_CORPUS) + [question, *NODE_CHOICES], vocab_size=512)
    config = tiny_base_config()
    config.volume_grid = (8, 64, 64)
    config.group_names = ["shared", "report", "vqa_closed", "vqa_open"]
    config.num_volume_tokens, config.volume_token_id = 2, int(tokenizer.eos_token_id)
    hu = np.random.default_rng(0).normal(0, 100, (8, 32, 32)).astype(np.float32)
    meta = {"spacing": (5.0, 1.0, 1.0), "answer_letter": "B", **_location_meta("enlarged lymph node", "subcarinal region", NODE_CHOICES)}
    closed = Sample(hu, closed_vqa_prompt(question, NODE_CHOICES), closed_vqa_target("B", "subcarinal region"), "vqa_closed", "location", dict(meta))
    open_ = Sample(hu, question, "subcarinal region", "vqa_open", "location", dict(meta))
    evidence = _Evidence("3D encoder: axial series. Found: nothing.", 4)

    def targets(batch):
        return [tokenizer.decode(row[row != -100][:-1].tolist()).strip() for row in batch["labels"]]

    assert targets(collate([closed, open_], tokenizer, config, volume_features=evidence)) == ["B. subcarinal region", "subcarinal region"]
    faithful = collate([closed, open_], tokenizer, config, volume_features=evidence, faithful_answers=True)
    assert targets(faithful) == ["D. no enlarged lymph node is seen", "no enlarged lymph node is seen"]


# --------------------------------------------------------------------------- evidence files


def _write_seed(job):
    from pathlib import Path

    from napari_tghmoe.med3d.evidence_files import write_evidence_file

    seed, spacing, out = job
    write_evidence_file(Path(out) / f"{seed}.json", {"seed": seed, "spacing": list(spacing)})
    return f"{seed}: written"


def test_evidence_writers_share_one_command_line_and_write_whole_files(tmp_path, capsys):
    import json

    from napari_tghmoe.med3d.evidence_files import seeds_main

    assert seeds_main("test", _write_seed, ["--seeds", "3-5", "--out", str(tmp_path / "ev"), "--spacing", "2x1x1", "--workers", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["3: written", "4: written", "5: written"]  # in seed order
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["3.json", "4.json", "5.json"]  # no .tmp left
    assert json.loads((tmp_path / "ev" / "4.json").read_text()) == {"seed": 4, "spacing": [2.0, 1.0, 1.0]}


def test_the_truth_beside_the_evidence_reads_findings_as_objects_or_dicts(two_finding_phantom):
    from dataclasses import asdict

    from napari_tghmoe.med3d.evidence_files import truth_record

    phantom = two_finding_phantom
    as_objects = truth_record(phantom.phase, "axial", phantom.volume.spacing, phantom.findings)
    as_dicts = truth_record(phantom.phase, "axial", phantom.volume.spacing, [asdict(f) for f in phantom.findings])
    assert as_objects == as_dicts
    assert [f["kind"] for f in as_objects["findings"]] == [f.kind for f in phantom.findings]
    assert all(isinstance(v, int) for f in as_objects["findings"] for v in f["center_voxel"])
