"""Image-free baselines: what the question and its choices give away without the image."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest

from napari_tghmoe.eval.baselines import (
    HAND_RULE,
    PRIOR,
    ClosedItem,
    ImageFreePrior,
    hand_rule_letter,
    score_rule,
)
from napari_tghmoe.phantom import QTYPES, make_phantom

GRID = (16, 48, 64)


@lru_cache(maxsize=None)
def phantom_items(first: int, count: int) -> tuple[ClosedItem, ...]:
    """Closed items of phantoms as the data loaders make them (plane drawn from the seed)."""
    items = []
    for seed in range(first, first + count):
        p = make_phantom(seed, "chest" if seed % 2 == 0 else "abdomen", shape=GRID, plane=None)
        items += [ClosedItem(q.qtype, q.question, q.choices, q.answer_letter, f"phantom:{seed}") for q in p.vqa]
    return tuple(items)


def test_the_learnt_image_free_prior_is_near_chance_on_200_held_out_phantoms():
    """Learnt on 400 training phantoms, scored on 200 held-out ones. By design every option is
    right 1/4 of the times it is shown, so the prior should score ~0.25 per type. Bound 0.40
    per type: organ and abnormality have ~80 held-out items (binomial sd ~0.05 around 0.25), and
    location keeps a small real skew (the generator falls back to roomier locations when a lesion
    does not fit, e.g. the anterior right liver lobe; ~0.3 measured). Overall (~700 items,
    sd ~0.017) the bound is 0.31. The old choice lists scored 1.0 (plane), 0.59 (organ,
    abnormality), 0.43 (location) and 0.57 overall."""
    prior = ImageFreePrior().fit(phantom_items(0, 400))
    held_out = phantom_items(100000, 200)
    summary = score_rule(prior.predict, held_out)
    assert set(summary["per_type"]) == set(QTYPES)
    for qtype, row in summary["per_type"].items():
        assert row["accuracy"] <= 0.40, (qtype, row)
        assert row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]
    assert summary["accuracy"] <= 0.31, summary
    hand = score_rule(hand_rule_letter, held_out)
    assert hand["per_type"]["plane"]["accuracy"] <= 0.40 and hand["accuracy"] <= 0.31


def test_the_prior_finds_a_planted_leak_and_breaks_ties_by_text():
    always_axial = [
        ClosedItem("plane", "Which plane?", choices, "ABCD"[choices.index("axial")], f"case{i}")
        for i, choices in enumerate(
            [("axial", "coronal", "sagittal", "oblique"), ("coronal", "axial", "oblique", "sagittal"), ("sagittal", "oblique", "coronal", "axial")] * 5
        )
    ]
    prior = ImageFreePrior().fit(always_axial)
    assert score_rule(prior.predict, always_axial)["accuracy"] == 1.0
    assert prior.rate(always_axial[0], "axial") == pytest.approx(16 / 19)
    # never-seen options count as chance; ties go to the alphabetically first text
    unseen = ClosedItem("organ", "Which organ?", ("spleen", "liver", "kidney", "lung"), "A", "x")
    assert prior.predict(unseen) == "C"


def test_the_hand_rule_answers_axial_no_finding_the_first_organ_and_portal_venous():
    def item(qtype, choices):
        return ClosedItem(qtype, "?", choices, "A", "c")

    assert hand_rule_letter(item("plane", ("coronal", "sagittal", "axial", "oblique"))) == "C"
    assert hand_rule_letter(item("phase", ("arterial", "portal venous", "delayed", "non-contrast"))) == "B"
    assert hand_rule_letter(item("organ", ("none of these organs", "heart", "liver", "lung"))) == "C"
    assert hand_rule_letter(item("abnormality", ("renal cyst", "lung nodule", "no abnormality", "pleural effusion"))) == "C"
    assert hand_rule_letter(item("location", ("left upper lobe", "no lung nodule is seen", "right upper lobe", "right middle lobe"))) == "B"


def test_tghmoe_eval_baseline_writes_a_table_with_intervals(tmp_path, monkeypatch, capsys):
    from napari_tghmoe.cli import main

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "baselines.json"
    code = main(
        [
            "eval-baseline",
            "--train",
            "phantom:seeds=0-11,region=both,shape=8x48x48",
            "--data",
            "phantom:seeds=100000-100007,region=both,shape=8x48x48",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert {PRIOR, HAND_RULE} <= set(results["baselines"]) and results["n_cases"] == 8
    markdown = out.with_suffix(".md").read_text()
    assert f"| Question type | n | {PRIOR} |" in markdown and "| plane | 8 |" in markdown
    assert " [" in markdown.split("| **overall** |")[1]
    assert "closed accuracy" in capsys.readouterr().err
    assert main(["eval-baseline", "--train", "phantom:region=chest", "--data", "phantom:seeds=1", "--out", str(out)]) == 2
