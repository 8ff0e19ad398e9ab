"""Training recipes: one TOML file says what to build, what to train on, and for how long.

A recipe is the reproducible record of a run (the demo model's card quotes its recipe), so
every knob that changes the result lives here and nothing is read from the environment.
Layout (all sections optional except ``[data]``)::

    name = "demo"
    seed = 0

    [model]                      # either a base folder ...
    base = "/models/Qwen2.5-VL-3B-Instruct"
    # ... or a small Qwen2.5-VL shape built from scratch (see napari_tghmoe.model.tiny)
    [model.tiny]
    vocab_size = 800
    text_hidden = 128
    [model.moe]                  # TGHMoEConfig fields
    moe_blocks = [2, 3]
    volume_grid = [32, 96, 128]
    # optional: a pre-trained 3D encoder whose tokens go to the LLM beside the video tokens
    # [model] volume_encoder = "demo" (the bundled resources/demo-seg-model) or a folder;
    # [model.moe] volume_tokens_grid / volume_projector_experts / volume_projector_hidden

    [tokenizer]                  # "base" (the base folder's), a folder, or "build" (BPE on the corpus)
    source = "build"
    vocab_size = 800

    [data]
    train = ["phantom:seeds=0-599,region=both,shape=32x96x128"]
    task_weights = { report = 0.4, vqa_closed = 0.45, vqa_open = 0.15 }

    [stage1]                     # and [stage2]: StageSettings fields
    steps = 600
    lr = 2e-3

    [eval]
    data = "phantom:seeds=100000-100039,region=both,shape=32x96x128"
    report_phrasings = "report_heldout"
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe file that cannot be used (names the file and the reason)."""


@dataclass
class ModelSpec:
    """What to train: a base folder (real Qwen2.5-VL or TGH-MoE) or a small shape built here."""

    base: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs of tiny_base_config
    moe: dict[str, Any] = field(default_factory=dict)  # TGHMoEConfig MoE / input fields
    gradient_checkpointing: bool = False
    #: A Med3DInsight segmentation model folder ("demo": the bundled one) attached as a frozen 3D
    #: encoder (``napari_tghmoe.model.volume_tokens``); "" = none. Stage 1 trains its projector,
    #: both stages the projector's text gate; the encoder's weights never change.
    volume_encoder: str = ""
    #: What its tokens carry: "encoder" (pooled bottleneck) or "evidence" (what its segmentation
    #: found: ``napari_tghmoe.med3d.evidence``; the folder must be a cascade).
    volume_token_source: str = "encoder"
    #: With "evidence": the certainty from which a finding is also written in the words after the
    #: tokens (``TGHMoEConfig.volume_words_min_certainty``); None keeps the model's.
    evidence_words_min_certainty: float | None = None
    #: With "evidence": the decoding bias toward copying the evidence words
    #: (``TGHMoEConfig.volume_words_copy_bias``, ``napari_tghmoe.model.copying``); None keeps the model's.
    evidence_words_copy_bias: float | None = None

    def evidence_settings(self) -> dict[str, float]:
        """The evidence settings this recipe sets, as ``TGHMoEConfig`` fields."""
        chosen = {
            "volume_words_min_certainty": self.evidence_words_min_certainty,
            "volume_words_copy_bias": self.evidence_words_copy_bias,
        }
        return {key: float(value) for key, value in chosen.items() if value is not None}

    def volume_encoder_path(self) -> Path | None:
        if not self.volume_encoder:
            return None
        if self.volume_encoder == "demo":
            from napari_tghmoe._resources import resources_dir

            return Path(resources_dir()) / "demo-seg-model"
        return Path(self.volume_encoder).expanduser()


@dataclass
class TokenizerSpec:
    source: str = "base"  # "base", "build", or a folder holding tokenizer.json
    vocab_size: int = 800


@dataclass
class DataSpec:
    """Training data: data specs (see ``napari_tghmoe.datasets.load_dataset_spec``)."""

    train: list[str] = field(default_factory=list)
    tasks: str = "all"  # report, vqa, vqa_closed, vqa_open, all
    phrasing: str = "train"
    task_weights: dict[str, float] = field(default_factory=dict)  # sampling weight per task (default: as loaded)
    max_length: int | None = None  # truncate targets so a sequence fits
    cache_dir: str | None = None
    preload: bool = True  # keep prepared volumes in memory (phantoms, small sets)
    #: Train on zeros instead of the image (same shapes, same batches): the control that says how
    #: much of a score the question and choices alone give a model trained on the same budget.
    zero_image: bool = False
    #: Report targets state only the true findings the evidence words state (napari_tghmoe.train.faithful):
    #: a model trained on findings it was not shown learns to invent findings.
    faithful_reports: bool = False
    #: Questions about a finding are answered as the evidence words answer them, where that answer
    #: is a choice (napari_tghmoe.train.faithful.faithful_answer): truth the words contradict taught
    #: the model to doubt its words.
    faithful_answers: bool = False


@dataclass
class StageSettings:
    """Optimisation settings of one stage."""

    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    #: Base parts to train besides the stage's own (``set_stage``) parts: "vision", "llm",
    #: "embeddings", "lm_head", "patch_embed". Only for a base trained from scratch (the demo):
    #: a real pretrained base stays frozen, as the method says.
    also_train: list[str] = field(default_factory=list)
    #: Which stage's trainable set to use (2 by default in [stage2]); "1" in [stage2] lets an
    #: ablation continue stage 1 for the second budget.
    trainable_stage: int | None = None
    #: Weight of the demo's auxiliary vision loss from phantom ground truth
    #: (``napari_tghmoe.train.vision_probe``); 0 = off. Only for a vision tower trained from scratch.
    vision_probe_coef: float = 0.0
    #: Weight, inside that loss, of the volume-level question "does this volume have a finding of
    #: this kind / in this location?" (multiple-instance: the highest patch logit); 0 = off.
    vision_probe_presence: float = 0.0
    #: The per-patch part of that loss: "balanced" (positives and all negatives weighted half
    #: each) or "hard" (positives against the ``vision_probe_hardest`` highest-scoring negative
    #: patches of each volume and word, so that lighting up a whole organ is not enough).
    vision_probe_dense: str = "balanced"
    vision_probe_hardest: int = 8
    #: Average the LM loss within each sample, then over samples (default: over all target
    #: tokens of the batch, as transformers does), so short answers weigh as much as reports.
    lm_loss_per_sample: bool = False


@dataclass
class EvalSpec:
    """Held-out evaluation (never trained on): data spec and phrasing lists."""

    data: str = ""
    phrasing: str = "heldout"
    report_phrasings: str = "report_heldout"
    question_phrasings: str = "question_heldout"
    limit: int | None = None
    max_new_tokens: int = 256


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage1: StageSettings = field(default_factory=StageSettings)
    stage2: StageSettings = field(default_factory=lambda: StageSettings(trainable_stage=2))
    eval: EvalSpec = field(default_factory=EvalSpec)
    #: Stage 1 continued in phases, each a partial recipe (e.g. ``seed``, ``[stage1]`` values,
    #: ``data.task_weights``) merged over this one, starting from the previous phase's output
    #: with a fresh optimiser (``tghmoe train --stage both`` runs them; see :func:`stage1_phases`).
    stage1_continue: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None  # where it was read from

    def stage(self, stage: int) -> StageSettings:
        if stage not in (1, 2):
            raise RecipeError(f"{self.path or self.name}: stage must be 1 or 2, got {stage}")
        settings = self.stage1 if stage == 1 else self.stage2
        if settings.trainable_stage is None:
            settings.trainable_stage = stage
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelSpec,
    "tokenizer": TokenizerSpec,
    "data": DataSpec,
    "stage1": StageSettings,
    "stage2": StageSettings,
    "eval": EvalSpec,
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


def merge_tables(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, table by table (a copy; neither is changed)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "task_weights":
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def stage1_phases(recipe: Recipe) -> list[Recipe]:
    """The recipe's stage-1 phases: itself, then each ``stage1_continue`` entry merged over it.

    A phase may change the ``model`` table (e.g. a finer vision patch): that phase is built anew
    and takes every matching tensor of the previous phase (:func:`phase_changes_model`), and the
    change carries over to the phases after it. Tokenizer and phases stay fixed.
    """
    base = {k: v for k, v in recipe.to_dict().items() if k not in ("path", "stage1_continue")}
    phases = [recipe]
    for index, update in enumerate(recipe.stage1_continue, start=2):
        if "stage1_continue" in update or "tokenizer" in update:
            raise RecipeError(f"{recipe.path}: stage1_continue #{index - 1} may not change the tokenizer or phases")
        if "model" in update:
            base = merge_tables(base, {"model": update["model"]})
        phase = recipe_from_dict(merge_tables(base, update), f"{recipe.path} (stage-1 phase {index})")
        phases.append(phase)
    return phases


#: Model settings that change how the model is used, not its tensors: a phase may set them and
#: still continue from the previous phase's folder whole.
SETTINGS_NOT_OF_THE_NETWORK = frozenset({"evidence_words_min_certainty", "evidence_words_copy_bias"})


def phase_changes_model(recipe: Recipe, index: int) -> bool:
    """Does stage-1 phase ``index`` (1 = the recipe's own stage 1) change the network (its model
    table, beyond :data:`SETTINGS_NOT_OF_THE_NETWORK`)?"""
    return index >= 2 and bool(set(recipe.stage1_continue[index - 2].get("model", {})) - SETTINGS_NOT_OF_THE_NETWORK)


def recipe_from_dict(values: dict[str, Any], source: str = "recipe") -> Recipe:
    values = dict(values)
    continuations = values.pop("stage1_continue", [])
    if not isinstance(continuations, list) or not all(isinstance(c, dict) for c in continuations):
        raise RecipeError(f"{source}: stage1_continue must be a list of tables ([[stage1_continue]])")
    sections = {}
    for name, cls in _SECTIONS.items():
        section = values.pop(name, {})
        if not isinstance(section, dict):
            raise RecipeError(f"{source}: [{name}] must be a table")
        if name == "stage2":
            section = {"trainable_stage": 2, **section}
        sections[name] = _build(cls, section, f"{source} [{name}]")
    top = _build(Recipe, values, source)
    for name, value in sections.items():
        setattr(top, name, value)
    top.path = source
    top.stage1_continue = [dict(c) for c in continuations]
    _validate(top)
    for phase in stage1_phases(top)[1:]:
        _validate(phase)
    return top


def _validate(recipe: Recipe) -> None:
    from napari_tghmoe.train.vision_probe import DENSE_LOSSES

    where = recipe.path or recipe.name
    if not recipe.model.base and not recipe.model.tiny:
        raise RecipeError(f"{where}: [model] needs base = FOLDER or a [model.tiny] shape")
    if recipe.tokenizer.source == "base" and not recipe.model.base:
        raise RecipeError(f"{where}: [tokenizer] source = 'base' needs [model] base; use 'build' for a tiny model")
    if not recipe.data.train:
        raise RecipeError(f"{where}: [data] train lists no data spec")
    encoder = recipe.model.volume_encoder_path()
    if encoder is not None and not (encoder / "config.json").is_file():
        raise RecipeError(f"{where}: [model] volume_encoder {encoder}: not a model folder (no config.json)")
    cut, bias = recipe.model.evidence_words_min_certainty, recipe.model.evidence_words_copy_bias
    if cut is not None and not 0.0 <= float(cut) <= 1.0:
        raise RecipeError(f"{where}: [model] evidence_words_min_certainty must be in [0, 1], got {cut!r}")
    if bias is not None and float(bias) < 0.0:
        raise RecipeError(f"{where}: [model] evidence_words_copy_bias must be >= 0, got {bias!r}")
    for flag in ("zero_image", "faithful_reports", "faithful_answers"):
        if not isinstance(getattr(recipe.data, flag), bool):
            raise RecipeError(f"{where}: [data] {flag} must be true or false, got {getattr(recipe.data, flag)!r}")
    for stage in (recipe.stage1, recipe.stage2):
        if stage.schedule not in ("cosine", "linear", "constant"):
            raise RecipeError(f"{where}: schedule must be cosine, linear or constant, got {stage.schedule!r}")
        if stage.steps < 0 or stage.batch_size < 1 or stage.gradient_accumulation_steps < 1:
            raise RecipeError(f"{where}: steps >= 0, batch_size >= 1, gradient_accumulation_steps >= 1")
        if stage.vision_probe_dense not in DENSE_LOSSES or stage.vision_probe_hardest < 1:
            raise RecipeError(
                f"{where}: vision_probe_dense must be balanced or hard and vision_probe_hardest >= 1, "
                f"got {stage.vision_probe_dense!r} and {stage.vision_probe_hardest}"
            )


def read_recipe_values(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML recipe (a ``RecipeError`` naming the file when it is unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from err


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe (a clear ``RecipeError`` naming the file when it is wrong)."""
    return recipe_from_dict(read_recipe_values(path), str(path))
