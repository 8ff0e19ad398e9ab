"""Metrics of the M3D protocol, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from napari_tghmoe.eval import metrics as M


# --------------------------------------------------------------------------- BLEU


def test_bleu1_is_clipped_unigram_precision_times_brevity_penalty():
    # 5 hypothesis words, all in the reference (6 words): p1 = 5/5, BP = exp(1 - 6/5).
    assert M.bleu("the cat sat on mat", "the cat sat on the mat", 1) == pytest.approx(math.exp(-0.2), abs=1e-4)
    # Clipping: "the" appears twice in the reference, 4 times in the hypothesis -> p1 = 2/4;
    # the hypothesis (4 words) is longer than the reference (3), so BP = 1.
    assert M.bleu("the the the the", "the cat the", 1) == pytest.approx(2 / 4, abs=1e-4)


def test_bleu4_is_the_geometric_mean_of_four_precisions_without_smoothing():
    # p1 = 5/5, p2 = 3/4 ("on mat" missing), p3 = 2/3, p4 = 1/2, BP = exp(-0.2).
    expected = (1 * 0.75 * (2 / 3) * 0.5) ** 0.25 * math.exp(-0.2)
    assert M.bleu("the cat sat on mat", "the cat sat on the mat", 4) == pytest.approx(expected, abs=1e-4)
    # No smoothing (as M3D's `evaluate` bleu): a 3-word answer has no 4-gram -> 0.
    assert M.bleu("the cat sat", "the cat sat on the mat", 4) == 0.0
    assert M.bleu("the cat sat on the mat", "the cat sat on the mat", 4) == pytest.approx(1.0)


# --------------------------------------------------------------------------- ROUGE


def test_rouge_l_comes_from_the_longest_common_subsequence():
    # Same six words reordered: every unigram matches (ROUGE-1 = 1) but the LCS is
    # "the cat sat" (3 words): P = R = 3/6 -> F = 0.5.
    scores = M.rouge("on the mat the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(0.5)
    # One substitution: LCS = 5 of 6 on both sides -> F = 5/6.
    assert M.rouge("the cat was on the mat", "the cat sat on the mat")["rougeL"] == pytest.approx(5 / 6)


# --------------------------------------------------------------------------- METEOR


def test_meteor_of_an_exact_match_is_one_minus_the_fragmentation_penalty():
    # One chunk of n matched words: penalty = 0.5 * (1 / n) ** 3.
    assert M.meteor("the cat sat", "the cat sat") == pytest.approx(1 - 0.5 / 27, abs=1e-6)
    assert M.meteor("The lungs are clear.", "the lungs are clear.") == pytest.approx(1 - 0.5 / 5**3, abs=1e-6)


def test_meteor_matches_wordnet_synonyms():
    # "car" and "auto" share a WordNet synset: 3 matches in one chunk, as for an exact match.
    # (Without WordNet the score would be (1 - 0.5) * 2/3 = 1/3: two chunks of 2 of 3 words.)
    assert M.meteor("the car stopped", "the auto stopped") == pytest.approx(1 - 0.5 / 27, abs=1e-6)


def test_meteor_counts_chunks_and_recall_weighting():
    # Hypothesis "sat the cat" vs reference "the cat sat": 3 matches in 2 chunks.
    # P = R = 1 -> Fmean = 1; penalty = 0.5 * (2/3)^3.
    assert M.meteor("sat the cat", "the cat sat") == pytest.approx(1 - 0.5 * (2 / 3) ** 3, abs=1e-6)
    # "the cat" vs "the cat sat": P = 1, R = 2/3, Fmean = PR / (0.9 P + 0.1 R); one chunk of 2.
    fmean = (2 / 3) / (0.9 + 0.1 * 2 / 3)
    assert M.meteor("the cat", "the cat sat") == pytest.approx((1 - 0.5 * (1 / 2) ** 3) * fmean, abs=1e-6)


def test_meteor_tokens_split_sentences_like_word_tokenize():
    assert M.meteor_tokens("A 5 mm nodule. No effusion.") == ["A", "5", "mm", "nodule", ".", "No", "effusion", "."]


def test_wordnet_folder_is_built_from_debian_files_plus_lexnames(tmp_path):
    # (Loading it is exercised by the METEOR tests through ensure_wordnet; a second full
    # WordNet load here would cost ~10 s.)
    folder = M.build_wordnet_folder("/usr/share/wordnet", tmp_path / "nltk_data")
    assert folder == tmp_path / "nltk_data" / "corpora" / "wordnet"
    for name in ("data.noun", "index.noun", "data.verb", "index.sense", "lexnames"):
        assert (folder / name).is_file(), name
    lexnames = [line.split() for line in (folder / "lexnames").read_text().splitlines()]
    assert len(lexnames) == 45
    assert lexnames[0] == ["00", "adj.all", "3"] and lexnames[-1][1] == "adj.ppl"
    with pytest.raises(FileNotFoundError, match="no WordNet"):
        M.build_wordnet_folder(tmp_path / "empty", tmp_path / "other")


# --------------------------------------------------------------------------- BERTScore


def test_bertscore_uses_the_local_minilm_folder():
    folder = M.find_bertscore_model()
    assert folder is not None and (folder / "config.json").is_file()
    result = M.bertscore(
        ["There is a lung nodule in the right upper lobe.", "There is a lung nodule in the right upper lobe."],
        ["There is a lung nodule in the right upper lobe.", "The kidneys are normal."],
    )
    assert result.reason is None and result.f1 is not None
    assert result.f1[0] == pytest.approx(1.0, abs=1e-4)
    assert result.f1[1] < 0.9


def test_missing_bertscore_model_is_null_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("TGHMOE_BERTSCORE_MODEL", str(tmp_path))  # no config.json there
    summary = M.text_metrics(["the cat sat"], ["the cat sat"])
    assert summary["bertscore_f1"] is None
    assert "no local BERTScore model" in summary["notes"]["bertscore_f1"]
    assert summary["bleu1"] == pytest.approx(1.0)


def test_text_metrics_average_per_sample_and_per_type():
    summary = M.text_metrics(
        ["the cat sat on mat", "axial"],
        ["the cat sat on the mat", "coronal"],
        groups=["organ", "plane"],
        use_bertscore=False,
    )
    assert summary["n"] == 2
    assert summary["bleu1"] == pytest.approx((math.exp(-0.2) + 0.0) / 2, abs=1e-4)
    assert summary["per_type"]["plane"]["bleu1"] == 0.0
    assert summary["per_type"]["organ"]["rouge1"] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert len(summary["per_sample"]) == 2


# --------------------------------------------------------------------------- closed VQA


CHOICES = ["lung", "liver", "kidney", "spleen"]


@pytest.mark.parametrize(
    ("text", "choices", "letter"),
    [
        ("B. liver", CHOICES, "B"),
        ("B", None, "B"),
        ("(B)", None, "B"),
        ("the answer is B", None, "B"),
        ("The answer is (C).", None, "C"),
        ("Answer: d", None, "D"),
        ("[A] lung", None, "A"),
        ("c)", None, "C"),
        ("Option D is correct", None, "D"),
        ("I think it is C. kidney", None, "C"),
        ("liver", CHOICES, "B"),  # the choice text alone
        ("The liver.", CHOICES, "B"),
        ("A 12 mm lung nodule in the right upper lobe.", None, None),  # an article, not a letter
        ("the answer is a lung nodule", None, None),
        ("lung and liver", CHOICES, None),  # two choices named: no commitment
        ("", CHOICES, None),
    ],
)
def test_answer_letter_parsing(text, choices, letter):
    assert M.parse_answer_letter(text, choices) == letter


def test_closed_accuracy_overall_and_per_type_with_the_m3d_rule_beside_it():
    summary = M.closed_vqa_accuracy(
        predictions=["A. axial", "B", "C. liver", "(D)", "nonsense"],
        answer_letters=["A", "B", "D", "D", "A"],
        qtypes=["plane", "plane", "organ", "organ", "phase"],
    )
    assert summary["accuracy"] == pytest.approx(3 / 5)
    # M3D counts "A." / "B." substrings: only "A. axial" qualifies ("B" has no dot).
    assert summary["accuracy_m3d"] == pytest.approx(1 / 5)
    assert summary["per_type"]["plane"]["accuracy"] == 1.0
    assert summary["per_type"]["organ"]["accuracy"] == 0.5
    assert summary["per_type"]["phase"] == {"n": 1, "accuracy": 0.0, "accuracy_m3d": 0.0, "unparsed": 1}


# --------------------------------------------------------------------------- findings

TRUTH = [
    {"kind": "lung nodule", "location": "right upper lobe"},
    {"kind": "pleural effusion", "location": "right pleural space"},
]


def test_finding_recall_and_precision_need_kind_and_location():
    report = (
        "FINDINGS:\nLungs: There is a 12 mm lung nodule in the right upper lobe.\n"
        "Pleura: There is a 20 mm pleural effusion in the left pleural space.\n"
        "Mediastinum and hila: There is a 15 mm enlarged lymph node in the subcarinal region."
    )
    score = M.finding_scores(report, TRUTH)
    assert (score.n_true, score.n_stated, score.n_true_found, score.n_stated_true) == (2, 3, 1, 1)
    assert score.recall == pytest.approx(1 / 2)
    assert score.precision == pytest.approx(1 / 3)


def test_negated_findings_and_repeats_in_the_impression_are_not_stated_twice():
    report = (
        "Lungs: There is a 12 mm lung nodule in the right upper lobe. No pleural effusion.\n"
        "IMPRESSION:\n1. 12 mm lung nodule in the right upper lobe.\n2. Without enlarged lymph node."
    )
    stated = M.extract_stated_findings(report)
    assert stated == [M.StatedFinding("lung nodule", "right upper lobe")]
    score = M.finding_scores(report, TRUTH)
    assert score.recall == 0.5 and score.precision == 1.0


def test_a_kind_without_a_known_location_counts_as_stated_but_never_true():
    score = M.finding_scores("There is a lung nodule.", TRUTH)
    assert score.n_stated == 1 and score.precision == 0.0 and score.recall == 0.0


def test_normal_reports_score_on_normal_phantoms_and_micro_averages():
    normal = M.finding_scores("The lungs are clear. No pleural fluid.\nIMPRESSION: No acute abnormality.", [])
    assert normal.recall is None and normal.precision is None and normal.normal_correct is True
    invented = M.finding_scores("There is a 5 mm renal cyst in the left kidney, lower pole.", [])
    assert invented.normal_correct is False and invented.precision == 0.0
    hit = M.finding_scores("There is a 12 mm lung nodule in the right upper lobe.", TRUTH)
    summary = M.aggregate_finding_scores([normal, invented, hit])
    assert summary["recall"] == pytest.approx(1 / 2)  # 1 of 2 true findings over all reports
    assert summary["precision"] == pytest.approx(1 / 2)  # 1 of 2 stated findings is true
    assert summary["normal_correct"] == pytest.approx(1 / 2)


def test_phantom_ground_truth_reports_score_perfectly_and_agree_with_the_phantom_reader():
    from napari_tghmoe.phantom import extract_findings, make_phantom

    seen_findings = 0
    for seed, region in [(3, "chest"), (4, "abdomen"), (11, "chest"), (12, "abdomen"), (21, "chest")]:
        phantom = make_phantom(seed, region=region, shape=(8, 48, 48))
        score = M.finding_scores(phantom.report, phantom.findings)
        seen_findings += score.n_true
        assert score.n_stated_true == score.n_stated == len({(f.kind, f.location) for f in phantom.findings})
        stated = {(s.kind, s.location) for s in M.extract_stated_findings(phantom.report)}
        assert stated == set(extract_findings(phantom.report))
    assert seen_findings > 0  # the seeds above include abnormal cases



def test_the_evaluation_scorer_and_the_phantom_scorer_follow_one_rule_for_nothing_to_count():
    """0/0 is undefined (None), not 1.0, in both scorers: recall of a normal scan, precision of a
    report that states nothing; both give the same numbers on the same report."""
    from napari_tghmoe.phantom import finding_recall_precision, make_phantom

    cases = [make_phantom(seed, region=region, shape=(8, 48, 48)) for seed in range(6) for region in ("chest", "abdomen")]
    normal = next(p for p in cases if not p.findings)
    abnormal = next(p for p in cases if p.findings)
    reports = [(p.report, p) for p in cases] + [("FINDINGS: Unremarkable.", abnormal), ("FINDINGS: Unremarkable.", normal)]
    for text, phantom in reports:
        score = M.finding_scores(text, phantom.findings)
        assert (score.recall, score.precision) == finding_recall_precision(text, phantom.findings)
    assert finding_recall_precision(normal.report, normal.findings) == (None, None)
    assert M.finding_scores("FINDINGS: Unremarkable.", abnormal.findings).precision is None
    assert M.finding_scores("FINDINGS: Unremarkable.", abnormal.findings).recall == 0.0


# --------------------------------------------------------------------------- bootstrap intervals


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_cases():
    import numpy as np

    rng = np.random.default_rng(3)
    widths = []
    for n in (40, 400, 4000):
        correct = (rng.random(n) < 0.6).astype(float)
        low, high = M.cluster_bootstrap_interval(correct, np.ones(n), range(n))
        estimate = correct.mean()
        assert low <= estimate <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # about the binomial 95 % width (2 x 1.96 x sqrt(p (1 - p) / n)) at n = 4000
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 4000), rel=0.2)
    # deterministic (fixed seed)
    assert M.cluster_bootstrap_interval([1, 0, 1, 1], [1, 1, 1, 1], "abcd") == M.cluster_bootstrap_interval(
        [1, 0, 1, 1], [1, 1, 1, 1], "abcd"
    )


def test_bootstrap_resamples_cases_not_questions():
    """Ten questions per scan, all right or all wrong together: resampling questions would
    pretend to 1000 independent answers; resampling the 100 scans gives the honest, wider interval."""
    import numpy as np

    rng = np.random.default_rng(0)
    case_right = rng.random(100) < 0.5
    correct = np.repeat(case_right, 10).astype(float)
    cases = np.repeat(np.arange(100), 10)
    by_case = M.cluster_bootstrap_interval(correct, np.ones(1000), cases)
    by_question = M.cluster_bootstrap_interval(correct, np.ones(1000), np.arange(1000))
    assert (by_case[1] - by_case[0]) > 2.5 * (by_question[1] - by_question[0])
    assert M.cluster_bootstrap_interval([1.0, 0.0], [1.0, 1.0], ["one scan", "one scan"]) is None


def test_recall_interval_is_a_ratio_of_sums_over_reports():
    scores = [
        M.finding_scores("There is a 10 mm lung nodule in the right upper lobe.", [{"kind": "lung nodule", "location": "right upper lobe"}]),
        M.finding_scores("The lungs are clear.", [{"kind": "lung nodule", "location": "left lower lobe"}]),
        M.finding_scores("The lungs are clear.", []),
    ] * 10
    aggregate = M.add_finding_intervals(M.aggregate_finding_scores(scores), scores, range(len(scores)))
    assert aggregate["recall"] == 0.5
    low, high = aggregate["recall_ci"]
    assert low < 0.5 < high
    assert aggregate["precision"] == 1.0 and aggregate["precision_ci"] == (1.0, 1.0)


def test_tables_show_each_accuracy_with_its_interval_and_the_baselines_beside_it():
    from napari_tghmoe.eval.evaluate import attach_baselines, format_with_interval, results_to_markdown

    assert format_with_interval(0.598, (0.5412, 0.6633)) == "0.598 [0.54, 0.66]"
    assert format_with_interval(0.598, None) == "0.598"
    predictions = ["A", "B", "A", "C"] * 25
    summary = M.closed_vqa_accuracy(predictions, ["A"] * 100, qtypes=["plane", "phase"] * 50)
    rows = summary.pop("per_sample")
    summary = M.add_accuracy_intervals(summary, rows, [i // 2 for i in range(100)])
    assert summary["accuracy_ci"][0] <= summary["accuracy"] <= summary["accuracy_ci"][1]
    assert set(summary["per_type"]) == {"plane", "phase"} and all("accuracy_ci" in row for row in summary["per_type"].values())
    results = {"task": "vqa_closed", "n": 100, "generation": {"max_new_tokens": 8}, "vqa_closed": summary}
    prior = {"n": 100, "accuracy": 0.25, "accuracy_ci": (0.2, 0.3), "per_type": {"plane": {"n": 50, "accuracy": 0.24, "accuracy_ci": (0.15, 0.33)}}}
    markdown = results_to_markdown(attach_baselines(results, {"image-free prior": prior}))
    assert "| Accuracy (M3D rule) | image-free prior |" in markdown
    assert "| **overall** | 100 | 0.500 [" in markdown and "| 0.250 [0.20, 0.30] |" in markdown
    assert "| plane | 50 | 1.000 [1.00, 1.00] |" in markdown and "0.240 [0.15, 0.33]" in markdown
    assert "| phase | 50 | 0.000 [0.00, 0.00] |" in markdown  # no prior given for phase: n/a
