"""Med3DInsight recipes: one TOML file for pre-training and fine-tuning (``recipes/med3d-*.toml``).

::

    name = "med3d-demo"
    seed = 0
    [model]                 # Med3DConfig fields (encoder, sizes, spacing, PSAT, loss switch)
    feature_size = 8
    [data]
    train = ["phantom:seeds=0-39,region=both,spacing=2.5x1.5x1.5"]
    heldout = "phantom:seeds=900000-900009,region=both,spacing=2.5x1.5x1.5"   # never trained on
    [pretrain]              # PretrainSettings
    steps = 150
    [finetune]              # FinetuneSettings
    steps = 300
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Med3DRecipeError(ValueError):
    """A recipe that cannot be used (names the file and the reason)."""


@dataclass
class LoopSettings:
    """Optimisation settings shared by pre-training and fine-tuning."""

    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    batch_size: int = 2  # crops per step
    weight_decay: float = 1e-5
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 50
    keep_checkpoints: int = 2


@dataclass
class PretrainSettings(LoopSettings):
    slices_per_crop: int = 8  # (plane, slice) pairs PSAT answers per crop and step
    slice_stride: int = 2  # targets exist for every n-th slice of each plane
    crops_per_volume: int = 1  # fixed crops per volume (their 2D targets are cached)
    target_model: str = "demo"  # frozen 2D model folder ("demo": resources/demo-model)
    target_image_size: int = 128  # slices are resized to this square for the 2D vision tower


@dataclass
class FinetuneSettings(LoopSettings):
    label_fraction: float = 1.0  # share of the training volumes whose labels are used
    lesion_crop_fraction: float = 0.5  # crops centred on a finding voxel (else anywhere in the body)
    # How those crops pick their finding: "voxel" (any finding voxel: a 300 mL effusion is drawn
    # ~100x as often as a 3 mL nodule) or "kind" (a kind, then one finding of it, then a voxel).
    lesion_sampling: str = "voxel"
    classification_weight: float = 0.5  # weight of the finding-presence BCE beside Dice + CE
    loss: str = "dice_ce"  # dice_ce (MONAI DiceCELoss) | dice_focal (DiceFocalLoss: rare small labels)
    focal_gamma: float = 2.0  # dice_focal only
    background_weight: float = 1.0  # cross-entropy weight of label 0 (others 1): < 1 for rare small labels
    batch_dice: bool = False  # one Dice per label over the whole batch instead of per crop
    context_model: str = ""  # organ model whose labels a finding model with context_groups reads ("demo": the bundled one)
    # Hard negatives: this share of the crops is centred on phantom structures that look like
    # findings but are not (bowel loops beside lymph nodes, pulmonary vessels beside nodules).
    lookalike_crop_fraction: float = 0.0
    lookalike_structures: list[str] = field(default_factory=list)  # phantom structure names


@dataclass
class VerifierSettings(LoopSettings):
    """``tghmoe train-verifier``: the second look at the finding model's proposals."""

    data: list[str] = field(default_factory=list)  # labelled phantoms whose proposals it learns from
    crop_size: list[int] = field(default_factory=lambda: [40, 40, 40])  # voxels of the finding model's grid
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    min_probability: float = 0.5  # a proposal the verifier gives less for its kind is no finding
    positive_fraction: float = 0.5  # share of true findings in a batch (the rest look-alikes), each kind as often
    # More true findings, without proposals (no finding-model pass): e.g. the finding model's own
    # training phantoms, whose lesions are real lesions all the same. A hundred phantoms hold only
    # five to thirty findings of each kind.
    truth_data: list[str] = field(default_factory=list)
    label_smoothing: float = 0.1  # keeps the second look's probabilities graded, so a threshold means something
    max_shift: int = 4  # crops move up to this many voxels per axis (a proposal is rarely centred on its lesion)
    # A candidate in the lungs shows the verifier the structure's own extent (its component grown
    # through denser-than-lung voxels inside the lungs' outline), not the finder's partial mask.
    grow_lung_masks: bool = False


@dataclass
class DataSettings:
    train: list[str] = field(default_factory=list)
    heldout: str = ""


@dataclass
class Med3DRecipe:
    name: str = "med3d"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    data: DataSettings = field(default_factory=DataSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    verifier: VerifierSettings = field(default_factory=VerifierSettings)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config(self) -> Any:
        from napari_tghmoe.med3d.encoder import Med3DConfig

        try:
            return Med3DConfig(**self.model)
        except (TypeError, ValueError) as err:
            raise Med3DRecipeError(f"{self.path or self.name} [model]: {err}") from err


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise Med3DRecipeError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


def recipe_from_dict(values: dict[str, Any], source: str = "recipe") -> Med3DRecipe:
    values = dict(values)
    sections = {
        "data": _build(DataSettings, values.pop("data", {}), f"{source} [data]"),
        "pretrain": _build(PretrainSettings, values.pop("pretrain", {}), f"{source} [pretrain]"),
        "finetune": _build(FinetuneSettings, values.pop("finetune", {}), f"{source} [finetune]"),
        "verifier": _build(VerifierSettings, values.pop("verifier", {}), f"{source} [verifier]"),
    }
    model = values.pop("model", {})
    recipe = _build(Med3DRecipe, values, source)
    recipe.model = dict(model)
    for name, value in sections.items():
        setattr(recipe, name, value)
    recipe.path = source
    if not recipe.data.train:
        raise Med3DRecipeError(f"{source}: [data] train lists no data spec")
    for loop in (recipe.pretrain, recipe.finetune, recipe.verifier):
        if loop.schedule not in ("cosine", "linear", "constant"):
            raise Med3DRecipeError(f"{source}: schedule must be cosine, linear or constant, got {loop.schedule!r}")
        if loop.steps < 0 or loop.batch_size < 1:
            raise Med3DRecipeError(f"{source}: steps >= 0 and batch_size >= 1")
    if recipe.finetune.loss not in ("dice_ce", "dice_focal"):
        raise Med3DRecipeError(f"{source}: [finetune] loss must be dice_ce or dice_focal, got {recipe.finetune.loss!r}")
    if not 0.0 < recipe.finetune.label_fraction <= 1.0:
        raise Med3DRecipeError(f"{source}: label_fraction must be in (0, 1], got {recipe.finetune.label_fraction}")
    if recipe.finetune.lesion_sampling not in ("voxel", "kind"):
        raise Med3DRecipeError(f"{source}: [finetune] lesion_sampling must be voxel or kind, got {recipe.finetune.lesion_sampling!r}")
    _check_lookalikes(recipe.finetune, source)
    recipe.config()  # validate the model table now, with the file's name
    return recipe


def _check_lookalikes(settings: FinetuneSettings, source: str) -> None:
    from napari_tghmoe.phantom import LABEL_NAMES

    share = settings.lookalike_crop_fraction + settings.lesion_crop_fraction
    if settings.lookalike_crop_fraction < 0.0 or share > 1.0:
        raise Med3DRecipeError(
            f"{source}: [finetune] lookalike_crop_fraction must be >= 0 and, with lesion_crop_fraction, at most 1"
        )
    if settings.lookalike_crop_fraction > 0.0 and not settings.lookalike_structures:
        raise Med3DRecipeError(f"{source}: [finetune] lookalike_crop_fraction needs lookalike_structures")
    known = set(LABEL_NAMES.values())
    unknown = sorted(set(settings.lookalike_structures) - known)
    if unknown:
        raise Med3DRecipeError(
            f"{source}: [finetune] lookalike_structures {', '.join(unknown)} are not phantom structures "
            f"(known: {', '.join(sorted(known))})"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Med3DRecipe:
    """Read a TOML recipe, with ``--set a.b=VALUE`` overrides, or a clear error naming the file."""
    from napari_tghmoe.train.cli import apply_overrides

    path = Path(path)
    if not path.is_file():
        raise Med3DRecipeError(f"{path}: recipe file not found")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise Med3DRecipeError(f"{path}: not valid TOML ({err})") from err
    return recipe_from_dict(apply_overrides(values, overrides or []), str(path))
