"""Report document and exports: formats, de-identification, DICOM SR references, safe writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_tghmoe.io import CTVolume, load_volume, write_dicom_series
from napari_tghmoe.report import (
    BASIC_TEXT_SR_SOP_CLASS,
    REPORT_FORMATS,
    ReportDocument,
    ReportExistsError,
    export_all,
    export_report,
    format_for_path,
)
from napari_tghmoe.transcript import Transcript


@dataclass
class _AnswerRecord:
    """Field-for-field what the engine's ``Answer`` carries (the report reads it duck-typed)."""

    text: str = "Liver: a 2 cm hypodense lesion in segment VI. Lungs clear."
    question: str = "Generate a radiology report for this CT."
    prompt_kind: str = "report"
    task_probs: dict = field(default_factory=lambda: {"report": 0.8, "vqa_closed": 0.15, "vqa_open": 0.05})
    routing: object = None
    timings: dict = field(default_factory=lambda: {"preprocess_s": 0.01, "tokens_per_second": 42.0})
    device: str = "cpu"
    precision: str = "fp32"
    model_name: str = "tiny-tghmoe"
    weights_sha256: str = "0123456789abcdef" * 4
    peak_memory: int | None = None


@pytest.fixture(scope="module")
def dicom_volume(tmp_path_factory) -> CTVolume:
    folder = tmp_path_factory.mktemp("dicom") / "Doe_Jane_CT"
    hu = np.full((4, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 40
    write_dicom_series(
        CTVolume(hu=hu, spacing=(2.5, 0.8, 0.8), description="CT ABDOMEN"),
        folder,
        patient_name="Doe^Jane",
        patient_id="MRN-4711",
    )
    return load_volume(folder)


def test_every_format_is_written_and_names_no_patient(dicom_volume, tmp_path):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume)
    paths = export_all(document, tmp_path, "abdomen")

    assert sorted(p.suffix for p in paths) == sorted(REPORT_FORMATS.values())
    for path in paths:
        raw = path.read_bytes()
        assert raw, path
        for identifier in (b"Doe", b"Jane", b"MRN-4711", b"Doe_Jane_CT"):
            assert identifier not in raw, (path.name, identifier)

    text = (tmp_path / "abdomen.txt").read_text()
    assert "hypodense lesion in segment VI" in text
    assert "CT ABDOMEN" in text and "4 x 16 x 16" in text
    assert "tiny-tghmoe" in text and "report 0.80" in text
    assert "# CT report" in (tmp_path / "abdomen.md").read_text()

    data = json.loads((tmp_path / "abdomen.json").read_text())
    assert data["answer"].startswith("Liver:")
    assert data["question"] == _AnswerRecord.question
    assert data["weights_sha256"] == _AnswerRecord().weights_sha256
    assert data["volume"]["shape"] == [4, 16, 16]
    assert data["volume"]["spacing_mm"] == pytest.approx([2.5, 0.8, 0.8])
    assert data["task_probs"]["report"] == pytest.approx(0.8)
    assert "identifiers" not in data and "source_path" not in data


def test_sr_references_the_source_study_and_series(dicom_volume, tmp_path):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume)
    path = export_report(document, tmp_path / "report.dcm")

    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == BASIC_TEXT_SR_SOP_CLASS
    assert sr.Modality == "SR"
    assert str(sr.PatientName) == "" and sr.PatientID == ""
    assert sr.StudyInstanceUID == dicom_volume.study_uid
    assert sr.SeriesInstanceUID != dicom_volume.series_uid  # the SR is a series of its own
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == dicom_volume.study_uid
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == dicom_volume.series_uid
    source_uids = {pydicom.dcmread(f).SOPInstanceUID for f in Path(dicom_volume.source).iterdir()}
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedSOPSequence} == source_uids
    texts = [item.TextValue for box in sr.ContentSequence for item in box.ContentSequence]
    assert _AnswerRecord.text in texts
    assert _AnswerRecord.question in texts


def test_identifiers_only_when_asked(dicom_volume, tmp_path):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume, include_identifiers=True)
    paths = export_all(document, tmp_path, "named", formats=["txt", "json", "sr"])

    assert "Doe^Jane" in paths[0].read_text()
    assert json.loads(paths[1].read_text())["identifiers"]["patient_id"] == "MRN-4711"
    assert str(pydicom.dcmread(paths[2]).PatientName) == "Doe^Jane"


def test_non_dicom_volume_gives_sr_without_evidence(tmp_path):
    volume = CTVolume(hu=np.zeros((2, 8, 8), np.int16), description="phantom")
    path = export_report(ReportDocument.from_answer(_AnswerRecord(), volume), tmp_path / "r.dcm")
    sr = pydicom.dcmread(path)
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert sr.StudyInstanceUID  # a fresh study of its own


def test_never_overwrites_silently(tmp_path):
    document = ReportDocument(question="q", answer="first")
    target = export_report(document, tmp_path / "r.txt")

    with pytest.raises(ReportExistsError, match="r.txt"):
        export_report(ReportDocument(question="q", answer="second"), target)
    assert "first" in target.read_text()

    # export_all checks every target before writing any: no half-written set
    with pytest.raises(ReportExistsError):
        export_all(document, tmp_path, "r", formats=["json", "txt"])
    assert not (tmp_path / "r.json").exists()

    export_report(ReportDocument(question="q", answer="second"), target, overwrite=True)
    assert "second" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]  # no temporary files left


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    document = ReportDocument(question="q", answer="a")

    def broken(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ReportDocument, "to_sr_dataset", broken)
    with pytest.raises(RuntimeError):
        export_report(document, tmp_path / "r.dcm")
    assert list(tmp_path.iterdir()) == []


def test_format_from_suffix():
    assert format_for_path("a/b.TXT") == "txt"
    assert format_for_path("x.dcm") == "sr"
    with pytest.raises(ValueError, match="unknown report format"):
        format_for_path("x.pdf")


def test_document_round_trips_through_a_dict():
    document = ReportDocument.from_answer(_AnswerRecord())
    again = ReportDocument.from_dict(json.loads(document.to_json()))
    assert again.to_text() == document.to_text()


def test_transcript_autosaves_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "chat" / "transcript.jsonl"
    transcript = Transcript(path)
    transcript.add("user", "Is there a liver lesion?")
    answer = transcript.add("assistant", "")
    transcript.update(answer, "Yes, in segment VI.", report={"answer": "Yes"})
    with open(path, "a") as handle:  # a crash in the middle of writing the next line
        handle.write('{"id": 3, "role": "us')

    reloaded = Transcript(path)
    assert [(t.role, t.text) for t in reloaded] == [
        ("user", "Is there a liver lesion?"),
        ("assistant", "Yes, in segment VI."),
    ]
    assert reloaded.answers()[0].meta["report"] == {"answer": "Yes"}
    assert len(path.read_text().splitlines()) == 2  # compacted on load

    reloaded.add("user", "next")
    assert reloaded.turns[-1].id == 3
    reloaded.clear()
    assert len(Transcript(path)) == 0


def test_a_report_with_its_own_sections_gets_no_second_findings_heading(tmp_path):
    text = "TECHNIQUE: CT of the chest.\n\nFINDINGS:\nLungs: clear.\n\nIMPRESSION:\nNo acute abnormality."
    volume = CTVolume(hu=np.zeros((2, 8, 8), np.int16), description="phantom")
    sectioned = ReportDocument.from_answer(_AnswerRecord(text=text), volume)
    plain = ReportDocument.from_answer(_AnswerRecord(), volume)
    question = ReportDocument.from_answer(_AnswerRecord(text="Axial.", question="Which plane?", prompt_kind="question"), volume)
    assert [line for line in sectioned.to_text().splitlines() if "FINDINGS" in line] == ["FINDINGS:"]
    assert "\nREPORT\nTECHNIQUE:" in sectioned.to_text() and "## Report\n" in sectioned.to_markdown()
    assert "\nFINDINGS\nLiver:" in plain.to_text() and "## Findings\n" in plain.to_markdown()
    assert "\nANSWER\nAxial." in question.to_text()
