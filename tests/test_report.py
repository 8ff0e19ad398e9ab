"""Report document and exports: formats, de-identification, the DICOM SR a PACS can take, safe writes."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from napari_tghmoe import deid
from napari_tghmoe.io import CTVolume, load_volume, write_dicom_series
from napari_tghmoe.report import (
    COMPREHENSIVE_3D_SR_SOP_CLASS,
    CT_IMAGE_STORAGE,
    DISCLAIMER,
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
    findings: list | None = None


_SOURCE_HEADER = {
    "PatientBirthDate": "19610412",
    "PatientSex": "F",
    "IssuerOfPatientID": "GENERAL-HOSP",
    "AccessionNumber": "ACC-99817",
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "ReferringPhysicianName": "House^Gregory",
}
#: Everything of the source that identifies the patient or the study (and must stay out).
_IDENTIFIERS = (b"Doe", b"Jane", b"MRN-4711", b"Doe_Jane_CT", b"19610412", b"GENERAL-HOSP", b"ACC-99817", b"House")


@pytest.fixture(autouse=True)
def pseudonym_secret(tmp_path, monkeypatch) -> Path:
    """Each test gets its own pseudonym key (never the user's real config folder)."""
    path = tmp_path / "secret" / "deid-secret"
    monkeypatch.setenv(deid.SECRET_ENV, str(path))
    return path


def _write_series(folder: Path, patient_name: str, patient_id: str, study_uid: str | None = None) -> CTVolume:
    hu = np.full((4, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 40
    write_dicom_series(
        CTVolume(hu=hu, spacing=(2.5, 0.8, 0.8), description="CT ABDOMEN"),
        folder,
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        extra_attributes=_SOURCE_HEADER,
    )
    return load_volume(folder)


@pytest.fixture(scope="module")
def dicom_volume(tmp_path_factory) -> CTVolume:
    return _write_series(tmp_path_factory.mktemp("dicom") / "Doe_Jane_CT", "Doe^Jane", "MRN-4711")


def _source_uids(volume: CTVolume) -> dict[str, set[str]]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(Path(volume.source).iterdir())]
    return {
        "study": {volume.study_uid},
        "series": {volume.series_uid},
        "frame": {volume.frame_of_reference_uid},
        "instances": {str(h.SOPInstanceUID) for h in headers},
    }


def _dciodvfy(path: Path) -> list[str]:
    """dicom3tools' IOD validator on ``path``: its output lines (errors and warnings)."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy not found: install the Debian package dicom3tools (scripts/_setup_env.sh does)"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def _items(dataset, meaning: str) -> list:
    """Content items (any depth) whose concept name has ``meaning``."""
    found = []
    for item in getattr(dataset, "ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            found.append(item)
        found += _items(item, meaning)
    return found


def test_every_format_is_written_and_names_no_patient(dicom_volume, tmp_path):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume)
    paths = export_all(document, tmp_path, "abdomen")

    assert sorted(p.suffix for p in paths) == sorted(REPORT_FORMATS.values())
    for path in paths:
        raw = path.read_bytes()
        assert raw, path
        for identifier in _IDENTIFIERS:
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
    assert "identifiers" not in data and "source_path" not in data and "findings" not in data


def test_deidentified_sr_is_a_pseudonymous_patient_in_a_study_of_its_own(dicom_volume, tmp_path, pseudonym_secret):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume)
    path = export_report(document, tmp_path / "report.dcm")
    raw = path.read_bytes()
    sr = pydicom.dcmread(path)
    secret = deid.load_or_create_secret(pseudonym_secret)
    source = _source_uids(dicom_volume)

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_SOP_CLASS and sr.Modality == "SR"
    # a patient a PACS can file: non-empty, pseudonymous, flagged as de-identified
    assert sr.PatientID.startswith("ANON-") and len(sr.PatientID) == 29
    assert str(sr.PatientName) == "ANON^" + sr.PatientID[5:]
    assert sr.PatientIdentityRemoved == "YES" and sr.DeidentificationMethod
    emptied = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName")
    for keyword in emptied:
        assert str(sr.get(keyword, "")) == "", keyword
    # a new study (the keyed hash of the source's) and a new series
    assert sr.StudyInstanceUID != dicom_volume.study_uid
    assert sr.StudyInstanceUID == deid.pseudonymous_uid(secret, dicom_volume.study_uid)
    assert sr.SeriesInstanceUID not in source["series"]
    # the evidence points at the source instances under their pseudonymous UIDs only
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sr.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == deid.pseudonymous_uid(secret, dicom_volume.series_uid)
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedSOPSequence} == {
        deid.pseudonymous_uid(secret, uid) for uid in source["instances"]
    }
    assert {r.ReferencedSOPClassUID for r in referenced.ReferencedSOPSequence} == {CT_IMAGE_STORAGE}
    for uid in set().union(*source.values()):
        assert uid.encode() not in raw, uid
    for identifier in _IDENTIFIERS + (b"CT ABDOMEN",):
        assert identifier not in raw, identifier


def test_pseudonyms_are_stable_per_patient_and_distinct_between_patients(dicom_volume, tmp_path, pseudonym_secret):
    def export(volume: CTVolume, name: str) -> pydicom.Dataset:
        return pydicom.dcmread(export_report(ReportDocument.from_answer(_AnswerRecord(), volume), tmp_path / name))

    first, again = export(dicom_volume, "a.dcm"), export(dicom_volume, "b.dcm")
    assert (again.PatientID, str(again.PatientName), again.StudyInstanceUID) == (
        first.PatientID, str(first.PatientName), first.StudyInstanceUID
    )
    assert again.SOPInstanceUID != first.SOPInstanceUID
    assert oct(pseudonym_secret.stat().st_mode & 0o777) == "0o600"

    same_patient_new_study = export(_write_series(tmp_path / "s2", "Doe^Jane", "MRN-4711"), "c.dcm")
    assert same_patient_new_study.PatientID == first.PatientID
    assert same_patient_new_study.StudyInstanceUID != first.StudyInstanceUID
    other_patient = export(_write_series(tmp_path / "s3", "Roe^Richard", "MRN-0815"), "d.dcm")
    assert other_patient.PatientID != first.PatientID and str(other_patient.PatientName) != str(first.PatientName)

    # the pseudonym is keyed: another secret, another pseudonym for the same patient
    other_key = tmp_path / "other-secret"
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume)
    assert document.to_sr_dataset(secret_path=other_key).PatientID != first.PatientID
    key = b"k" * 32
    assert deid.pseudonymize_patient(key, ("id", "", "1")) != deid.pseudonymize_patient(key, ("id", "", "2"))


def test_a_damaged_pseudonym_secret_is_a_clear_error(tmp_path):
    secret = tmp_path / "deid-secret"
    secret.write_text("short\n")
    document = ReportDocument.from_answer(_AnswerRecord(), CTVolume(hu=np.zeros((2, 8, 8), np.int16)))
    with pytest.raises(deid.DeidSecretError, match=f"{secret}.*too short"):
        document.to_sr_dataset(secret_path=secret)


def test_identified_sr_copies_the_patient_and_study_modules(dicom_volume, tmp_path):
    document = ReportDocument.from_answer(_AnswerRecord(), dicom_volume, include_identifiers=True)
    paths = export_all(document, tmp_path, "named", formats=["txt", "json", "sr"])

    assert "Doe^Jane" in paths[0].read_text()
    assert json.loads(paths[1].read_text())["identifiers"]["patient_id"] == "MRN-4711"
    sr = pydicom.dcmread(paths[2])
    assert str(sr.PatientName) == "Doe^Jane" and sr.PatientID == "MRN-4711"
    assert sr.IssuerOfPatientID == "GENERAL-HOSP"
    assert (sr.PatientBirthDate, sr.PatientSex) == ("19610412", "F")
    assert sr.StudyInstanceUID == dicom_volume.study_uid
    assert (sr.AccessionNumber, sr.StudyDate, sr.StudyTime) == ("ACC-99817", "20240102", "101500")
    assert str(sr.ReferringPhysicianName) == "House^Gregory"
    assert sr.get("PatientIdentityRemoved") != "YES"
    assert sr.SeriesInstanceUID != dicom_volume.series_uid  # the SR is a series of its own
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == dicom_volume.study_uid
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == dicom_volume.series_uid
    referenced_instances = {r.ReferencedSOPInstanceUID for r in referenced.ReferencedSOPSequence}
    assert referenced_instances == _source_uids(dicom_volume)["instances"]


def test_sr_is_a_tid1500_report_with_the_ai_device_as_observer(dicom_volume, tmp_path):
    path = export_report(ReportDocument.from_answer(_AnswerRecord(), dicom_volume), tmp_path / "r.dcm")
    sr = highdicom.sr.srread(path)

    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert isinstance(sr.content, highdicom.sr.MeasurementReport)
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    (observer_type,) = _items(sr, "Observer Type")
    assert observer_type.ConceptCodeSequence[0].CodeMeaning == "Device"
    assert _items(sr, "Device Observer Name")[0].TextValue == "napari-tghmoe"
    assert _items(sr, "Device Observer Manufacturer")[0].TextValue == "napari-tghmoe"
    assert _items(sr, "Device Observer Model Name")[0].TextValue == "tiny-tghmoe"
    assert _items(sr, "Device Observer Serial Number")[0].TextValue == _AnswerRecord().weights_sha256
    assert _items(sr, "Device Observer UID")[0].UID.startswith("2.25.")
    (narrative,) = _items(sr, "Qualitative Evaluations")
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in narrative.ContentSequence}
    assert texts["Finding"] == _AnswerRecord.text
    assert texts["Request"] == _AnswerRecord.question
    assert "tiny-tghmoe" in texts["Comment"] and DISCLAIMER in texts["Comment"]
    assert sr.content.get_image_measurement_groups() == []  # this answer states no coded finding


def test_findings_are_coded_with_their_sites_sizes_and_positions(dicom_volume, tmp_path, pseudonym_secret):
    findings = [
        {"kind": "renal cyst", "location": "left kidney, lower pole", "size_mm": 12, "center_voxel": (2, 8, 9)},
        {"kind": "hypodense liver lesion", "location": "left lobe of the liver", "size_mm": 8},
    ]
    document = ReportDocument.from_answer(_AnswerRecord(findings=findings), dicom_volume)
    sr = highdicom.sr.srread(export_report(document, tmp_path / "f.dcm"))
    secret = deid.load_or_create_secret(pseudonym_secret)

    (placed,) = sr.content.get_volumetric_roi_measurement_groups()
    assert placed.finding_type == codes.SCT.Cyst
    (site,) = placed.finding_sites
    assert site.value == codes.SCT.Kidney
    assert site.laterality == codes.SCT.Left and site.topographical_modifier == codes.SCT.Inferior
    (diameter,) = placed.get_measurements()
    assert diameter.name == codes.SCT.Diameter and diameter.value == pytest.approx(12)
    point = placed.roi[0]
    assert point.GraphicType == "POINT"
    assert list(point.GraphicData) == pytest.approx(list(dicom_volume.index_to_patient((2, 8, 9))), abs=1e-4)
    assert point.ReferencedFrameOfReferenceUID == deid.pseudonymous_uid(secret, dicom_volume.frame_of_reference_uid)

    (unplaced,) = [g for g in sr.content.get_image_measurement_groups() if not hasattr(g, "roi")]
    assert unplaced.finding_type.meaning == "hypodense liver lesion"
    assert unplaced.finding_type.scheme_designator == "99TGHMOE"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99TGHMOE"
    assert [s.value for s in unplaced.finding_sites] == [codes.SCT.Liver]
    assert "findings" in json.loads(document.to_json())


def test_a_report_text_states_findings_only_in_the_affirmative_sentence():
    text = (
        "FINDINGS:\nThere is a 14 mm lung nodule in the right upper lobe. "
        "No pleural effusion in the left pleural space.\nIMPRESSION:\n14 mm lung nodule in the right upper lobe."
    )
    document = ReportDocument.from_answer(_AnswerRecord(text=text))
    assert document.findings == [{"kind": "lung nodule", "location": "right upper lobe", "size_mm": 14.0}]
    question = ReportDocument.from_answer(_AnswerRecord(text=text, prompt_kind="question"))
    assert question.findings == []


@pytest.mark.parametrize("include_identifiers", [False, True], ids=["deidentified", "identified"])
def test_dciodvfy_finds_no_error_in_the_sr(dicom_volume, tmp_path, include_identifiers):
    findings = [
        {"kind": "renal cyst", "location": "left kidney, lower pole", "size_mm": 12, "center_voxel": (2, 8, 9)}
    ]
    answers = {
        "report": _AnswerRecord(findings=findings),
        "question": _AnswerRecord(text="Axial.", question="Which plane?", prompt_kind="question"),
    }
    for name, answer in answers.items():
        document = ReportDocument.from_answer(answer, dicom_volume, include_identifiers=include_identifiers)
        path = export_report(document, tmp_path / f"{name}.dcm")
        lines = _dciodvfy(path)
        assert "Comprehensive3DSR" in lines, lines  # it validated against the right IOD
        assert [line for line in lines if line.startswith("Error")] == [], (name, lines)
        assert pydicom.dcmread(path).PatientID  # the DICOMDIR warning about an empty Patient ID is gone


def test_non_dicom_volume_gives_sr_without_evidence(tmp_path):
    volume = CTVolume(hu=np.zeros((2, 8, 8), np.int16), description="phantom")
    path = export_report(ReportDocument.from_answer(_AnswerRecord(), volume), tmp_path / "r.dcm")
    sr = pydicom.dcmread(path)
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert "PertinentOtherEvidenceSequence" not in sr
    assert sr.StudyInstanceUID and sr.PatientID.startswith("ANON-")  # a fresh study of its own
    assert [line for line in _dciodvfy(path) if line.startswith("Error")] == []


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
