"""``tghmoe ask`` / ``tghmoe report``: the engine on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_tghmoe.cli import main
from napari_tghmoe.cli_infer import expand_inputs, parse_shard
from napari_tghmoe.io import CTVolume, write_dicom_series


def _write_scan(folder: Path, seed: int = 0, patient_name: str = "Phantom^Anonymous") -> Path:
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 30, size=(8, 48, 48)).astype(np.int16)
    hu[:, 10:38, 10:38] += 60
    write_dicom_series(CTVolume(hu=hu, spacing=(2.0, 0.9, 0.9), description="CT CHEST"), folder, patient_name=patient_name)
    return folder


def test_ask_on_a_dicom_folder_prints_an_answer(tiny_tghmoe_folder, tmp_path, capsys):
    scan = _write_scan(tmp_path / "scan", patient_name="Doe^Jane")
    out_json = tmp_path / "answer.json"

    code = main(["ask", str(scan), "Is there a liver lesion?", "--model", str(tiny_tghmoe_folder),
                 "--max-new-tokens", "6", "--json", str(out_json)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out_json.read_text())
    assert record["answer"], "the tiny model produced no text"
    assert captured.out.strip() == record["answer"]  # what streamed is what was recorded
    assert record["question"] == "Is there a liver lesion?"
    assert record["volume"]["shape"] == [8, 48, 48]
    assert "cpu" in captured.err  # the device line goes to stderr, not into the answer
    assert "Doe" not in out_json.read_text()


def test_report_carries_on_past_a_corrupt_scan(tiny_tghmoe_folder, tmp_path, capsys):
    archive = tmp_path / "archive"
    _write_scan(archive / "good_scan")
    corrupt = archive / "broken_scan"
    corrupt.mkdir(parents=True)
    (corrupt / "slice_0001.dcm").write_bytes(b"this is not a DICOM file at all" * 10)
    out = tmp_path / "reports"

    code = main(["report", str(archive), "--out", str(out), "--model", str(tiny_tghmoe_folder),
                 "--max-new-tokens", "6"])

    err = capsys.readouterr().err
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good_scan.json", "good_scan.txt"]
    assert json.loads((out / "good_scan.json").read_text())["prompt_kind"] == "report"
    assert "FINDINGS" in (out / "good_scan.txt").read_text()
    failures = err.split("scan(s) failed:")[1]
    assert "broken_scan" in failures and "good_scan" not in failures

    # a second run never overwrites silently: the existing report is named as a failure
    code = main(["report", str(archive / "good_scan"), "--out", str(out), "--model", str(tiny_tghmoe_folder),
                 "--max-new-tokens", "2"])
    assert code == 1
    assert "exists" in capsys.readouterr().err


def test_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    scan = _write_scan(tmp_path / "scan")
    code = main(["ask", str(scan), "hello", "--model", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "no-such-model" in err


def test_inputs_expand_to_scans_and_shards_split_them(tmp_path):
    _write_scan(tmp_path / "a", seed=1)
    _write_scan(tmp_path / "nested" / "b", seed=2)
    (tmp_path / "c.nii.gz").write_bytes(b"")
    scans = expand_inputs([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in scans] == ["a", "c.nii.gz", "nested/b"]

    parts = [scans[i::n] for i, n in [parse_shard(f"{k}/2") for k in (1, 2)]]
    assert sorted(parts[0] + parts[1]) == sorted(scans) and not set(parts[0]) & set(parts[1])
    from napari_tghmoe.cli import CLIError

    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(CLIError):
            parse_shard(bad)
