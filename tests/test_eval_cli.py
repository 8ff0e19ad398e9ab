"""``evaluate`` and ``tghmoe eval``: generation over a dataset, scoring, JSON + Markdown."""

from __future__ import annotations

import json

import pytest

from napari_tghmoe.cli import main
from napari_tghmoe.eval.evaluate import evaluate, results_to_markdown, write_results
from napari_tghmoe.datasets import load_dataset_spec

SPEC = "phantom:seeds=3-5,region=both,shape=8x64x64"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))


def test_an_oracle_scores_perfectly_and_a_constant_guess_scores_its_share():
    samples = load_dataset_spec(SPEC, task="all")
    oracle = evaluate(lambda sample: sample.target, samples, use_bertscore=False)

    assert oracle["vqa_closed"]["accuracy"] == 1.0
    assert oracle["report"]["bleu1"] == pytest.approx(1.0) and oracle["report"]["rougeL"] == pytest.approx(1.0)
    assert oracle["vqa_open"]["bleu1"] == pytest.approx(1.0)
    findings = oracle["report"]["findings"]
    assert findings["n_true"] > 0 and findings["recall"] == 1.0 and findings["precision"] == 1.0
    assert set(oracle["vqa_closed"]["per_type"]) == {"plane", "phase", "organ", "abnormality", "location"}
    assert oracle["n"] == len(samples) == len(oracle["samples"])

    closed = [s for s in samples if s.task == "vqa_closed"]
    always_a = evaluate(lambda sample: "A", samples, task="vqa_closed", use_bertscore=False)
    share = sum(s.meta["answer_letter"] == "A" for s in closed) / len(closed)
    assert always_a["vqa_closed"]["accuracy"] == pytest.approx(share)
    assert "report" not in always_a and always_a["n"] == len(closed)


def test_a_report_that_invents_findings_loses_precision_not_fluency():
    samples = load_dataset_spec(SPEC, task="report")
    invented = "There is a 30 mm renal cyst in the left kidney, lower pole. There is a 9 mm lung nodule in the left upper lobe."
    results = evaluate(lambda sample: sample.target + "\n" + invented, samples, use_bertscore=False)
    findings = results["report"]["findings"]
    assert findings["recall"] == 1.0  # every true finding is still stated ...
    assert findings["precision"] < 1.0  # ... but the invented ones are counted against it
    assert results["report"]["rougeL"] > 0.5


def test_results_are_written_as_json_and_a_markdown_table(tmp_path):
    samples = load_dataset_spec(SPEC, task="vqa_closed")
    results = evaluate(lambda sample: sample.target, samples, use_bertscore=False, info={"model": "oracle", "data": SPEC})
    json_path, md_path = write_results(results, tmp_path / "out" / "results.json")
    assert json.loads(json_path.read_text())["vqa_closed"]["accuracy"] == 1.0
    markdown = md_path.read_text()
    assert md_path.suffix == ".md" and "| **overall** |" in markdown and "| plane |" in markdown
    assert markdown == results_to_markdown(results)


def test_tghmoe_eval_runs_end_to_end_on_a_tiny_model(tiny_tghmoe_folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        ["eval", "--model", str(tiny_tghmoe_folder), "--data", "phantom:seeds=1-2,region=chest,shape=8x64x64",
         "--task", "all", "--out", str(out), "--limit", "4", "--max-new-tokens", "4", "--no-bertscore",
         "--no-progress", "--device", "cpu"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads(out.read_text())
    assert results["n"] == 4 and results["generation"] == {"decoding": "greedy", "max_new_tokens": 4}
    assert results["data"].startswith("phantom:") and results["model"] == str(tiny_tghmoe_folder)
    assert all(isinstance(record["prediction"], str) for record in results["samples"])
    assert "report" in results and "findings" in results["report"]
    assert results["report"]["bertscore_f1"] is None and results["report"]["notes"]["bertscore_f1"] == "disabled"
    assert out.with_suffix(".md").read_text().startswith("# Evaluation:")
    assert "wrote" in captured.err


def test_closed_questions_are_scored_by_ranked_options_unless_free_letters_are_asked(tiny_tghmoe_folder, tmp_path, capsys):
    from napari_tghmoe.model.prompts import closed_choices

    runs = {}
    for name, extra in (("ranked", []), ("free", ["--free-letters"])):
        out = tmp_path / f"{name}.json"
        code = main(
            ["eval", "--model", str(tiny_tghmoe_folder), "--data", "phantom:seeds=1-2,region=chest,shape=8x64x64",
             "--task", "vqa_closed", "--out", str(out), "--limit", "4", "--max-new-tokens", "3", "--no-bertscore",
             "--no-progress", "--device", "cpu", *extra]
        )
        assert code == 0, capsys.readouterr().err
        runs[name] = json.loads(out.read_text())
    assert runs["ranked"]["closed_answers"] == "ranked options" and runs["free"]["closed_answers"] == "free letters"
    for record in runs["ranked"]["samples"]:  # every ranked answer is one of the question's options, verbatim
        assert record["prediction"] in {f"{letter}. {text}" for letter, text in closed_choices(record["prompt"])}
    assert [r["prediction"] for r in runs["free"]["samples"]] != [r["prediction"] for r in runs["ranked"]["samples"]]


def test_tghmoe_eval_reports_a_bad_spec_in_one_line(tiny_tghmoe_folder, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_tghmoe_folder), "--data", "phantom:region=chest", "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().startswith("tghmoe eval: error:") and "seeds=" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    code = main(["eval", "--data", f"m3d-vqa:{tmp_path / 'missing.csv'}", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "missing.csv" in capsys.readouterr().err


def test_zero_image_scoring_feeds_zeros_of_the_volume_s_shape(tiny_tghmoe_folder, tmp_path, capsys):
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.eval.evaluate import engine_generate_fn
    from napari_tghmoe.datasets import load_sample_volume

    engine = InferenceEngine.from_pretrained(tiny_tghmoe_folder, device="cpu")
    sample = load_dataset_spec("phantom:seeds=1,region=chest,shape=8x64x64", task="vqa_closed")[0]
    seen = []
    answer = engine.answer

    def spy(inputs, question, **kwargs):
        seen.append(inputs)
        yield from answer(inputs, question, **kwargs)

    engine.answer = spy
    engine_generate_fn(engine, 2)(sample)
    engine_generate_fn(engine, 2, zero_image=True)(sample)
    real, zeroed = seen
    assert real.pixel_values_videos.abs().sum() > 0
    assert zeroed.pixel_values_videos.shape == real.pixel_values_videos.shape
    assert not zeroed.pixel_values_videos.any()
    assert engine.prepare(load_sample_volume(sample)).pixel_values_videos.abs().sum() > 0

    out = tmp_path / "zero.json"
    code = main(
        ["eval", "--model", str(tiny_tghmoe_folder), "--data", "phantom:seeds=1,region=chest,shape=8x64x64",
         "--task", "vqa_closed", "--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--no-bertscore",
         "--no-progress", "--device", "cpu", "--zero-image"]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["zero_image"] is True
