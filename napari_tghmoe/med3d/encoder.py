"""The Med3DInsight 3D encoder, its configuration and the two models built on it.

* :class:`Med3DConfig` (a ``transformers.PretrainedConfig``): encoder kind and sizes, the label
  names and finding kinds, the working spacing and the sliding-window patch, and the PSAT /
  loss settings of pre-training. JSON values only, so ``save_pretrained`` round-trips them.
* :class:`Med3DBackbone`: a maintained MONAI network split into ``encode`` (the 3D encoder whose
  bottleneck tokens PSAT reads) and ``decode`` (the segmentation decoder). ``"segresnet"``
  (MONAI ``SegResNet``, the default) or ``"swin_unetr"`` (MONAI ``SwinUNETR``: ``swinViT`` is the
  encoder). SegResNet is the default because on this project's 2-core CPU a SegResNet step costs
  a fraction of a SwinUNETR step of the same patch (see the model card); SwinUNETR is the choice
  when a GPU is at hand.
* :class:`Med3DPretrainModel`: encoder + PSAT + reconstruction head + the learnable Mahalanobis
  factor (pre-training, ``tghmoe pretrain``).
* :class:`Med3DSegModel`: encoder + decoder (per-voxel labels) + a finding-classification head
  (presence of each finding kind in the window), ``tghmoe finetune-seg`` / ``tghmoe segment``.

Both models are ``PreTrainedModel`` subclasses: safetensors folders, offline, no remote code.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from napari_tghmoe.ct_windows import LUNG, SOFT_TISSUE
from napari_tghmoe.med3d.types import DEFAULT_FINDING_KINDS, DEFAULT_ORGANS, SegModelError

MODEL_TYPE = "med3dinsight"
SEG_ARCHITECTURE = "Med3DSegModel"
PRETRAIN_ARCHITECTURE = "Med3DPretrainModel"

#: (centre, width) HU windows, one input channel each: lung, soft tissue (napari_tghmoe.ct_windows).
DEFAULT_WINDOWS = (LUNG, SOFT_TISSUE)


class Med3DConfig(PretrainedConfig):
    r"""Configuration of the Med3DInsight encoder, its PSAT pre-training and its segmentation head.

    Encoder: ``encoder`` ("segresnet" | "swin_unetr"), ``feature_size`` (SegResNet init filters /
    SwinUNETR feature size), ``blocks_down`` / ``blocks_up`` (SegResNet), ``swin_depths`` /
    ``swin_heads`` (SwinUNETR), ``ct_windows`` (one input channel per HU window),
    ``position_channels`` (three more channels: each voxel's z, y, x position relative to the
    body's bounding box, -1..1, computed on the whole volume before windowing, so that a window
    knows where in the body it lies: which lung lobe a lung voxel belongs to is a matter of
    position, not of intensity).
    Labels: ``organ_names`` then ``finding_kinds`` follow background (label 0) in that order.
    Geometry: ``working_spacing`` (z, y, x) mm, ``patch_size`` (z, y, x) voxels of one window,
    ``sw_overlap``, ``sw_batch_size``; ``min_finding_ml`` drops smaller finding components and
    ``min_finding_probability`` those whose mean probability of their kind is lower (the voxels
    go back to the organ labels underneath).
    PSAT: ``psat_queries``, ``psat_layers``, ``psat_hidden``, ``psat_heads``, ``psat_ffn``,
    ``psat_slice_bins`` (slice-index rows of the plane x slice table), ``target_dim`` (the frozen
    2D model's embedding size). Loss: ``align`` ("ot" | "infonce"), ``ot_reg``, ``ot_mass``,
    ``infonce_temperature``, ``recon_weight``.
    Cascade: ``finding_model`` names a sub-folder holding a second, finer segmentation model whose
    labels are only finding kinds (``organ_names`` empty). When set, this model's own finding
    labels are ignored and the finder's replace them (``segment_volume``): focal lesions are
    < 0.1 % of the voxels and 2-3 voxels across on an organ model's coarse grid, so they get a
    model of their own at a finer spacing with lesion-centred training windows.
    ``context_groups`` (a finding model's): one more input channel per group of the organ
    model's organ names (e.g. ``[["liver"], ["right kidney", "left kidney"]]``), 1 where the organ
    model labels the voxel as one of them. The finding model then needs no wide window to tell a
    liver lesion from a renal cyst: the organ stage, which sees 192 mm windows, says where it is.
    ``finding_sites``: finding kind -> the organs it can lie in (a renal cyst in a kidney, a lung
    nodule or a pleural effusion beside a lung lobe). A component of that kind whose location (the
    organ most common around it) is another organ, or none, is not that finding: its voxels go back
    to the organ labels. Kinds not named (an enlarged lymph node) may lie anywhere.
    ``finding_verifier`` (a finding model's): a sub-folder holding a ``Med3DFindingVerifier``
    (:mod:`napari_tghmoe.med3d.verifier`) that looks again at each proposed component;
    ``verifier_channels`` and ``verifier_min_probability`` are the verifier's own settings.
    ``nodule_stage`` (a finding model's): the lung-nodule stage's logistic and cut
    (:class:`napari_tghmoe.med3d.nodules.NoduleShapeStage`); when set, it is the second look for
    lung nodules, at the scan's own spacing, in place of the verifier's.
    ``lesion_stages`` (a finding model's): kind -> the same kind of stage for another small focal
    kind (a hyperdense liver lesion), the second look for that kind in place of the verifier's.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        encoder: str = "segresnet",
        feature_size: int = 8,
        blocks_down: list[int] | tuple[int, ...] = (1, 2, 2, 4),
        blocks_up: list[int] | tuple[int, ...] = (1, 1, 1),
        swin_depths: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        swin_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24),
        ct_windows: Any = DEFAULT_WINDOWS,
        position_channels: bool = False,
        organ_names: list[str] | tuple[str, ...] = DEFAULT_ORGANS,
        finding_kinds: list[str] | tuple[str, ...] = DEFAULT_FINDING_KINDS,
        working_spacing: list[float] | tuple[float, ...] = (3.0, 3.0, 3.0),
        patch_size: list[int] | tuple[int, ...] = (64, 64, 64),
        sw_overlap: float = 0.25,
        sw_batch_size: int = 2,
        min_finding_ml: float = 0.1,
        min_finding_probability: float = 0.0,
        psat_queries: int = 300,
        psat_layers: int = 6,
        psat_hidden: int = 768,
        psat_heads: int = 8,
        psat_ffn: int = 2048,
        psat_slice_bins: int = 64,
        target_dim: int = 128,
        align: str = "ot",
        ot_reg: float = 0.03,
        ot_mass: float = 0.95,
        infonce_temperature: float = 0.07,
        recon_weight: float = 1.0,
        finding_model: str = "",
        context_groups: list[list[str]] | tuple = (),
        finding_sites: dict[str, list[str]] | None = None,
        finding_verifier: str = "",
        verifier_channels: list[int] | tuple[int, ...] = (16, 32, 64, 128),
        verifier_min_probability: float = 0.5,
        nodule_stage: dict[str, Any] | None = None,
        lesion_stages: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.encoder = str(encoder)
        self.feature_size = int(feature_size)
        self.blocks_down = [int(b) for b in blocks_down]
        self.blocks_up = [int(b) for b in blocks_up]
        self.swin_depths = [int(d) for d in swin_depths]
        self.swin_heads = [int(h) for h in swin_heads]
        self.ct_windows = [[float(c), float(w)] for c, w in ct_windows]
        self.position_channels = bool(position_channels)
        self.organ_names = [str(n) for n in organ_names]
        self.finding_kinds = [str(k) for k in finding_kinds]
        self.working_spacing = [float(s) for s in working_spacing]
        self.patch_size = [int(p) for p in patch_size]
        self.sw_overlap = float(sw_overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.min_finding_ml = float(min_finding_ml)
        self.min_finding_probability = float(min_finding_probability)
        self.psat_queries = int(psat_queries)
        self.psat_layers = int(psat_layers)
        self.psat_hidden = int(psat_hidden)
        self.psat_heads = int(psat_heads)
        self.psat_ffn = int(psat_ffn)
        self.psat_slice_bins = int(psat_slice_bins)
        self.target_dim = int(target_dim)
        self.align = str(align)
        self.ot_reg = float(ot_reg)
        self.ot_mass = float(ot_mass)
        self.infonce_temperature = float(infonce_temperature)
        self.recon_weight = float(recon_weight)
        self.finding_model = str(finding_model)
        self.context_groups = [[str(n) for n in group] for group in context_groups]
        self.finding_sites = {str(k): [str(n) for n in v] for k, v in (finding_sites or {}).items()}
        self.finding_verifier = str(finding_verifier)
        self.verifier_channels = [int(c) for c in verifier_channels]
        self.verifier_min_probability = float(verifier_min_probability)
        self.nodule_stage = dict(nodule_stage) if nodule_stage else None
        self.lesion_stages = {str(k): dict(v) for k, v in (lesion_stages or {}).items()}
        super().__init__(**kwargs)
        self.validate_med3d()

    def validate_med3d(self) -> None:
        if self.encoder not in ("segresnet", "swin_unetr"):
            raise ValueError(f"encoder must be 'segresnet' or 'swin_unetr', got {self.encoder!r}")
        if self.align not in ("ot", "infonce"):
            raise ValueError(f"align must be 'ot' or 'infonce', got {self.align!r}")
        from napari_tghmoe.med3d.nodules import NoduleShapeStage

        if self.nodule_stage:
            NoduleShapeStage.from_config(self.nodule_stage)  # a malformed stage fails when the model loads
        for kind, values in self.lesion_stages.items():
            if kind not in self.finding_kinds:
                raise ValueError(f"lesion_stages names {kind!r}, which is not one of finding_kinds {self.finding_kinds}")
            NoduleShapeStage.from_config(values)
        if len(self.working_spacing) != 3 or min(self.working_spacing) <= 0:
            raise ValueError(f"working_spacing must be three positive mm values, got {self.working_spacing}")
        stride = self.encoder_stride
        if len(self.patch_size) != 3 or any(p % stride for p in self.patch_size):
            raise ValueError(f"patch_size must be three multiples of {stride}, got {self.patch_size}")
        unknown_sites = sorted(set(self.finding_sites) - set(self.finding_kinds))
        if unknown_sites:
            raise ValueError(f"finding_sites names kinds this model does not label: {', '.join(unknown_sites)}")
        site_organs = {n for organs in self.finding_sites.values() for n in organs}
        if self.organ_names and not site_organs <= set(self.organ_names):  # a finding model's: checked in its cascade
            raise ValueError(f"finding_sites names organs this model does not label: {', '.join(sorted(site_organs - set(self.organ_names)))}")
        if self.psat_hidden % self.psat_heads:
            raise ValueError(f"psat_hidden ({self.psat_hidden}) must be divisible by psat_heads ({self.psat_heads})")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError("organ_names and finding_kinds must be distinct")
        if not 0.0 <= self.min_finding_probability <= 1.0:
            raise ValueError(f"min_finding_probability must be in [0, 1], got {self.min_finding_probability}")
        if self.finding_model and ("/" in self.finding_model or "\\" in self.finding_model or self.finding_model.startswith(".")):
            raise ValueError(f"finding_model must be a plain sub-folder name, got {self.finding_model!r}")

    # ------------------------------------------------------------------ derived
    @property
    def in_channels(self) -> int:
        return len(self.ct_windows) + (3 if self.position_channels else 0) + len(self.context_groups)

    @property
    def label_names(self) -> list[str]:
        """Structure name of each label value (0 = background)."""
        return ["background", *self.organ_names, *self.finding_kinds]

    @property
    def num_labels_total(self) -> int:
        return len(self.label_names)

    def finding_label(self, kind: str) -> int:
        return 1 + len(self.organ_names) + self.finding_kinds.index(kind)

    @property
    def encoder_stride(self) -> int:
        """How much the encoder's token grid is coarser than the input."""
        if self.encoder == "swin_unetr":
            return 32
        return 2 ** (len(self.blocks_down) - 1)

    @property
    def encoder_channels(self) -> int:
        if self.encoder == "swin_unetr":
            return self.feature_size * 16
        return self.feature_size * 2 ** (len(self.blocks_down) - 1)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return tuple(p // self.encoder_stride for p in self.patch_size)  # type: ignore[return-value]


AutoConfig.register(MODEL_TYPE, Med3DConfig, exist_ok=True)


class Med3DBackbone(nn.Module):
    """A MONAI segmentation network split into the 3D encoder and its decoder."""

    def __init__(self, config: Med3DConfig, out_channels: int) -> None:
        super().__init__()
        self.kind = config.encoder
        if self.kind == "segresnet":
            from monai.networks.nets import SegResNet

            self.net = SegResNet(
                spatial_dims=3,
                init_filters=config.feature_size,
                in_channels=config.in_channels,
                out_channels=out_channels,
                blocks_down=tuple(config.blocks_down),
                blocks_up=tuple(config.blocks_up),
                norm=("GROUP", {"num_groups": min(8, config.feature_size)}),
            )
        else:
            from monai.networks.nets import SwinUNETR

            self.net = SwinUNETR(
                in_channels=config.in_channels,
                out_channels=out_channels,
                feature_size=config.feature_size,
                depths=tuple(config.swin_depths),
                num_heads=tuple(config.swin_heads),
                spatial_dims=3,
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(B, C, D, H, W) -> the bottleneck feature map (B, C_enc, d, h, w) and what decode needs."""
        if self.kind == "segresnet":
            bottom, skips = self.net.encode(x)
            return bottom, skips
        hidden = self.net.swinViT(x, self.net.normalize)
        return hidden[4], (x, hidden)

    def decode(self, bottom: torch.Tensor, skips: Any) -> torch.Tensor:
        if self.kind == "segresnet":
            return self.net.decode(bottom, skips[::-1])
        net = self.net
        x, hidden = skips
        enc0 = net.encoder1(x)
        enc1 = net.encoder2(hidden[0])
        enc2 = net.encoder3(hidden[1])
        enc3 = net.encoder4(hidden[2])
        dec4 = net.encoder10(bottom)
        dec3 = net.decoder5(dec4, hidden[3])
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        return net.out(net.decoder1(dec0, enc0))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors only (what pre-training hands to fine-tuning)."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(self.kind, k)}


def is_encoder_key(kind: str, key: str) -> bool:
    """Is this backbone state-dict key part of the 3D encoder (not the decoder)?"""
    if kind == "segresnet":
        return key.startswith(("net.convInit.", "net.down_layers."))
    return key.startswith("net.swinViT.")


class _Med3DBase(PreTrainedModel):
    config_class = Med3DConfig
    base_model_prefix = "med3d"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """MONAI and torch layers initialise themselves; nothing to redo here."""


class Med3DSegModel(_Med3DBase):
    """Encoder + decoder (per-voxel logits) + per-window finding-presence logits."""

    def __init__(self, config: Med3DConfig) -> None:
        super().__init__(config)
        self.backbone = Med3DBackbone(config, config.num_labels_total)
        channels = config.encoder_channels
        self.finding_head = nn.Sequential(
            nn.Linear(2 * channels, channels), nn.GELU(), nn.Linear(channels, len(config.finding_kinds))
        )
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) normalised CT -> (voxel logits (B, L, D, H, W), finding logits (B, K))."""
        bottom, skips = self.backbone.encode(pixel_values)
        pooled = torch.cat([bottom.mean(dim=(2, 3, 4)), bottom.amax(dim=(2, 3, 4))], dim=1)
        return self.backbone.decode(bottom, skips), self.finding_head(pooled)


class Med3DPretrainModel(_Med3DBase):
    """Encoder + PSAT + volume reconstruction head + learnable Mahalanobis factor ``L``."""

    def __init__(self, config: Med3DConfig) -> None:
        super().__init__(config)
        from napari_tghmoe.med3d.psat import PlaneSliceAwareTransformer

        self.backbone = Med3DBackbone(config, config.num_labels_total)
        self.psat = PlaneSliceAwareTransformer(
            token_channels=config.encoder_channels,
            token_grid=config.token_grid,
            hidden=config.psat_hidden,
            queries=config.psat_queries,
            layers=config.psat_layers,
            heads=config.psat_heads,
            ffn=config.psat_ffn,
            slice_bins=config.psat_slice_bins,
            out_dim=config.target_dim,
        )
        stride = config.encoder_stride // 2  # reconstruct at half the input resolution
        self.recon_stride = 2
        self.recon_head = nn.ConvTranspose3d(
            config.encoder_channels, len(config.ct_windows), kernel_size=stride, stride=stride
        )
        # M = L L^T stays positive semi-definite whatever L learns.
        self.mahalanobis_factor = nn.Parameter(torch.eye(config.target_dim))
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, planes: torch.Tensor, slices: torch.Tensor, owner: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Encode each crop once, then ask PSAT for every (plane, slice) of ``owner`` crop.

        ``planes`` (N,) 0 axial / 1 coronal / 2 sagittal, ``slices`` (N,) slice index in the crop,
        ``owner`` (N,) which crop of the batch each query set reads.
        """
        bottom, _ = self.backbone.encode(pixel_values)
        tokens = bottom.flatten(2).transpose(1, 2)  # (B, d*h*w, C)
        sizes = torch.tensor(pixel_values.shape[2:], device=planes.device)
        slice_fraction = (slices.float() + 0.5) / sizes[planes].float()
        embedding = self.psat(tokens[owner], planes, slice_fraction)
        return {
            "embedding": embedding,
            "reconstruction": self.recon_head(bottom),
            "recon_target": torch.nn.functional.avg_pool3d(
                pixel_values[:, : len(self.config.ct_windows)], self.recon_stride
            ),
        }


# --------------------------------------------------------------------------- folders


def read_folder_config(folder: str | Path, want: str) -> Med3DConfig:
    """The folder's ``Med3DConfig`` after checking it holds a Med3DInsight model of kind ``want``.

    A clear :class:`SegModelError` (one line: folder and reason) for anything else, e.g. the
    TGH-MoE chat model folder or a pre-training folder given where a segmenter is expected.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegModelError(f"{folder}: model folder not found")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SegModelError(f"{folder}: not a model folder (no config.json)")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SegModelError(f"{folder}: config.json is not readable JSON ({err})") from err
    model_type = values.get("model_type")
    if model_type != MODEL_TYPE:
        raise SegModelError(
            f"{folder}: not a Med3DInsight model (model_type {model_type!r}, expected {MODEL_TYPE!r})"
        )
    architectures = values.get("architectures") or []
    if want not in architectures:
        raise SegModelError(f"{folder}: a {', '.join(architectures) or 'model'} folder, not a {want}")
    if not (folder / "model.safetensors").is_file():
        raise SegModelError(f"{folder}: no model.safetensors")
    return Med3DConfig.from_pretrained(str(folder), local_files_only=True)


def load_seg_model(folder: str | Path) -> Med3DSegModel:
    """A segmentation model folder, checked, in fp32 eval mode on the CPU."""
    read_folder_config(folder, SEG_ARCHITECTURE)
    with _quiet_loading():
        model = Med3DSegModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return model.float().eval()


def load_pretrain_model(folder: str | Path) -> Med3DPretrainModel:
    read_folder_config(folder, PRETRAIN_ARCHITECTURE)
    with _quiet_loading():
        return Med3DPretrainModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading weights" bar: a few-MB model loads in milliseconds, and CLI errors stay one line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def copy_encoder(source: nn.Module, target: Med3DSegModel) -> int:
    """Copy the 3D encoder tensors of ``source`` (a pre-training model) into ``target``."""
    theirs = source.backbone.encoder_state_dict()
    mine = target.backbone.state_dict()
    copied = 0
    with torch.no_grad():
        for key, tensor in theirs.items():
            if key in mine and mine[key].shape == tensor.shape:
                mine[key].copy_(tensor)
                copied += 1
    if copied == 0:
        raise SegModelError("the pre-trained encoder shares no tensor with this model (different encoder config)")
    return copied


#: The tiny configuration tests and dock development use (a model folder in seconds).
TINY_CONFIG: dict[str, Any] = {
    "encoder": "segresnet",
    "feature_size": 4,
    "blocks_down": [1, 1, 1],
    "blocks_up": [1, 1],
    "working_spacing": [8.0, 8.0, 8.0],
    "patch_size": [16, 16, 16],
    "sw_batch_size": 2,
    "psat_queries": 4,
    "psat_layers": 1,
    "psat_hidden": 16,
    "psat_heads": 2,
    "psat_ffn": 32,
    "psat_slice_bins": 8,
    "target_dim": 128,
    "min_finding_ml": 0.0,
}


def build_tiny_seg_model(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-weight segmentation model folder (seconds; for tests and the dock)."""
    torch.manual_seed(seed)
    config = Med3DConfig(**{**TINY_CONFIG, **overrides})
    model = Med3DSegModel(config)
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
