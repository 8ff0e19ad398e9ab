"""CT volume (HU) -> the video input a Qwen2.5-VL vision tower was pretrained on.

Choices, and why:

* **Three CT windows as the three colour channels** (lung (-600, 1500), soft tissue (40, 400),
  bone (400, 1800) as (centre, width) in HU by default; ``config.ct_windows`` overrides). A 2D
  MLLM sees RGB; a single grey window would throw away either lung or bone contrast, so, as
  MedGemma does for CT, each channel carries one window mapped to [0, 1].
* **The whole volume is resampled to one fixed model grid** (``config.volume_grid``, default
  32 x 256 x 256, depth a multiple of the temporal patch, height/width of patch x merge), so
  the token count is fixed and the routing trace maps back by plain scaling. Resampling is
  done once, in HU, with torch: an area (box) average on every axis that shrinks (otherwise a
  300-slice series reduced to 32 would skip most slices), then trilinear to the exact grid.
* **Normalisation and patch layout exactly as transformers' Qwen2-VL processors**: the
  processor's mean/std (CLIP defaults), then the flattening of ``Qwen2VLVideoProcessor``:
  ``(grid_t, tp, C, gh/m, m, p, gw/m, m, p)`` permuted to ``(grid_t, gh/m, gw/m, m, m, C, tp, p, p)``.
  The pretrained Conv3d patch embedding therefore sees what it was trained on, and
  :func:`patches_to_frames` undoes it.
* **Two kinds of intensities, handled explicitly.** A volume holds either Hounsfield units
  (``"hu"``: CT from DICOM, NIfTI, phantoms, CT-RATE) or display intensities in [0, 1]
  (``"unit"``: M3D-Cap / M3D-VQA ``.npy``, made from Radiopaedia JPEG/PNG slices, i.e. an image
  already windowed for display by whoever exported it, then min-max normalised per volume by
  M3D's ``m3d_cap_data_prepare.py``). The kind is ``CTVolume.metadata["intensity"]`` (set by the
  data loaders) or, without it, guessed: a float volume whose values all lie in [0, 1] is
  ``"unit"`` (no CT in HU does: air is -1000). The model's kind is ``config.input_intensity``
  (what it was trained on; "hu" when absent). The channels follow the model's kind:

  - an ``"hu"`` model: the three HU windows; a unit volume is first mapped back to pseudo-HU on
    the :data:`UNIT_DISPLAY_WINDOW` (soft tissue), so the soft-tissue channel sees it unchanged and
    the lung and bone channels see it compressed (there is no HU left to recover);
  - a ``"unit"`` model: the unit image itself, the same grey in all three channels (what a 2D MLLM
    sees of a grey display image); an HU volume is first made unit the M3D way: the
    :data:`UNIT_DISPLAY_WINDOW` clipped to [0, 1], then min-max normalised over the volume.

  A mismatch is converted, never refused, and :class:`IntensityMismatchWarning` says so (the engine
  warns; the chat dock's worker turns the warning into a napari notification).
* **Depth positions can follow millimetres** the way video positions follow seconds:
  Qwen2.5-VL advances the temporal rope position by ``tokens_per_second *
  second_per_grid_ts`` per temporal patch (then truncates to an integer), so with
  ``config.depth_mm_per_position`` set, ``second_per_grid_ts = mm_per_grid /
  (depth_mm_per_position * tokens_per_second)`` puts a 1 mm and a 5 mm series at their true
  depth. With it None (TGHMoEConfig's default) each temporal patch is one position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_tghmoe.ct_windows import MODEL_INPUT_WINDOWS, SOFT_TISSUE

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_tghmoe.io import CTVolume

DEFAULT_VOLUME_GRID = (32, 256, 256)
#: (centre, width) in HU: lung, soft tissue (mediastinum/abdomen), bone -> R, G, B.
DEFAULT_CT_WINDOWS = MODEL_INPUT_WINDOWS
#: OpenAI CLIP mean/std, the Qwen2-VL image/video processor defaults (Qwen normalises with them).
DEFAULT_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: None: one temporal rope position per temporal patch (TGHMoEConfig's default). A float such
#: as 10.0 makes positions follow depth: a 300 mm scan on a 16-step temporal grid then advances
#: about 2 positions per step, like a Qwen2.5-VL video at 2 frames per second.
DEFAULT_DEPTH_MM_PER_POSITION: float | None = None
#: rope truncates ``step * interval`` to an integer; a hair above keeps 3 * (1/3 * 3) at 3.
_TRUNCATION_GUARD = 1.0 + 1e-6
#: What air reads as; non-finite voxels (NaN padding of some exports) become air.
AIR_HU = -1024.0
#: Intensity kinds (``CTVolume.metadata["intensity"]``, ``config.input_intensity``).
INTENSITY_HU = "hu"
INTENSITY_UNIT = "unit"
INTENSITY_KINDS = (INTENSITY_HU, INTENSITY_UNIT)
#: Spellings accepted for the kinds ("normalized" is what the data loaders once wrote for "unit").
_INTENSITY_ALIASES = {"hu": INTENSITY_HU, "unit": INTENSITY_UNIT, "normalized": INTENSITY_UNIT, "normalised": INTENSITY_UNIT}
#: (centre, width) in HU of the display window assumed between HU and unit intensities: soft
#: tissue, the window most CT teaching images (M3D's source) are shown in. unit 0..1 <-> -160..240 HU.
UNIT_DISPLAY_WINDOW = SOFT_TISSUE


class IntensityMismatchWarning(UserWarning):
    """The volume's intensities are not of the kind the model was trained on (HU vs [0, 1] display
    intensities): the input was converted, but the model sees what it never saw in training."""


def intensity_kind(value: Any) -> str:
    """``"hu"`` or ``"unit"`` for any accepted spelling; ValueError otherwise."""
    kind = _INTENSITY_ALIASES.get(str(value).strip().lower())
    if kind is None:
        raise ValueError(f"intensity kind must be one of {INTENSITY_KINDS}, got {value!r}")
    return kind


@dataclass(frozen=True)
class VolumeIntensity:
    """A volume's intensity kind and where it came from (``guessed``: read off the values)."""

    kind: str
    guessed: bool
    reason: str


def volume_intensity(volume: Any) -> VolumeIntensity:
    """The intensity kind of a ``CTVolume`` (its ``metadata["intensity"]``) or array (guessed).

    Guess: a float volume, not constant, whose values all lie in [0, 1] is ``"unit"``: a CT in HU
    always holds air (about -1000) or tissue above 1 HU. Anything else is taken as ``"hu"``.
    """
    metadata = getattr(volume, "metadata", None) or {}
    if metadata.get("intensity") is not None:
        return VolumeIntensity(intensity_kind(metadata["intensity"]), False, "set by the loader")
    values = np.asarray(getattr(volume, "hu", volume))
    if values.dtype.kind == "f" and values.size:
        low, high = float(values.min()), float(values.max())  # NaN makes both NaN: taken as HU
        if 0.0 <= low < high <= 1.0:
            return VolumeIntensity(INTENSITY_UNIT, True, f"its values lie in [{low:.3g}, {high:.3g}], not in HU")
    return VolumeIntensity(INTENSITY_HU, True, "no intensity kind given; the values look like HU")


def unit_to_hu(unit: torch.Tensor, window: tuple[float, float] = UNIT_DISPLAY_WINDOW) -> torch.Tensor:
    """[0, 1] display intensities -> pseudo-HU on ``window`` (centre, width): the inverse of the
    windowing, the best an HU model can be given when the HU are gone."""
    centre, width = window
    return unit * width + (centre - width / 2.0)


def hu_to_unit(hu: torch.Tensor, window: tuple[float, float] = UNIT_DISPLAY_WINDOW) -> torch.Tensor:
    """HU -> [0, 1] the M3D way: the display ``window`` clipped to [0, 1], then min-max
    normalised over the volume (M3D's ``image - min`` then ``/ max(max, 1e-8)``)."""
    centre, width = window
    unit = ((hu - (centre - width / 2.0)) / width).clamp(0.0, 1.0)
    unit = unit - unit.min()
    return unit / unit.max().clamp(min=1e-8)


@dataclass(frozen=True)
class InputSettings:
    """The model-input fields of a (TGH-MoE or plain Qwen2.5-VL) config, resolved."""

    volume_grid: tuple[int, int, int]
    ct_windows: tuple[tuple[float, float], ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    tokens_per_second: float
    depth_mm_per_position: float | None
    input_intensity: str = INTENSITY_HU  # the kind the model was trained on (config.input_intensity)
    #: The processor's limits on pixels per frame (Qwen's min_pixels / max_pixels); None = no limit.
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_config(cls, config: Any = None, volume_grid: tuple[int, int, int] | None = None) -> InputSettings:
        """Read the fields from ``config`` (TGHMoEConfig or Qwen2_5_VLConfig), with defaults.

        A plain Qwen2.5-VL config lacks the CT fields, so every one falls back to the module
        defaults; ``volume_grid`` overrides the config's grid (rounded to legal multiples). The
        loader puts a model folder's own processor values (``preprocessor_config.json``: mean/std,
        min/max pixels) on the config (:func:`apply_processor_settings`), so they win here; a frame
        outside [min_pixels, max_pixels] is resized the way Qwen's processor does (``smart_resize``).
        """
        vision = getattr(config, "vision_config", None)
        patch = int(getattr(vision, "patch_size", 14))
        temporal = int(getattr(vision, "temporal_patch_size", 2))
        merge = int(getattr(vision, "spatial_merge_size", 2))
        tokens_per_second = float(getattr(vision, "tokens_per_second", 2) or 2)
        grid = volume_grid or getattr(config, "volume_grid", None) or DEFAULT_VOLUME_GRID
        windows = getattr(config, "ct_windows", None) or DEFAULT_CT_WINDOWS
        mean = getattr(config, "image_mean", None) or DEFAULT_IMAGE_MEAN
        std = getattr(config, "image_std", None) or DEFAULT_IMAGE_STD
        depth_mm = getattr(config, "depth_mm_per_position", DEFAULT_DEPTH_MM_PER_POSITION)
        input_intensity = intensity_kind(getattr(config, "input_intensity", None) or INTENSITY_HU)
        windows = tuple((float(c), float(w)) for c, w in windows)
        if len(windows) != 3 or any(w <= 0 for _, w in windows):
            raise ValueError(f"ct_windows must be three (centre, width>0) pairs, got {windows}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean and image_std need one value per channel (3)")
        min_pixels = _optional_int(getattr(config, "min_pixels", None))
        max_pixels = _optional_int(getattr(config, "max_pixels", None))
        grid = round_grid(grid, temporal, patch * merge)
        if min_pixels is not None or max_pixels is not None:
            grid = (grid[0], *fit_frame_pixels(grid[1], grid[2], patch * merge, min_pixels, max_pixels))
        return cls(
            volume_grid=grid,
            ct_windows=windows,
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
            patch_size=patch,
            temporal_patch_size=temporal,
            merge_size=merge,
            tokens_per_second=tokens_per_second,
            depth_mm_per_position=None if depth_mm in (None, 0) else float(depth_mm),
            input_intensity=input_intensity,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def fit_frame_pixels(
    height: int, width: int, multiple: int, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int]:
    """(height, width) of a frame resized into [min_pixels, max_pixels] as Qwen's processor does.

    transformers' ``smart_resize`` (Qwen2-VL image processor): the aspect ratio kept, both sides
    multiples of ``multiple`` (patch x merge). A frame already inside the limits is unchanged.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    low = multiple * multiple if min_pixels is None else int(min_pixels)
    high = max(height * width, low) if max_pixels is None else int(max_pixels)
    if low <= height * width <= high:
        return height, width
    return tuple(int(v) for v in smart_resize(height, width, factor=multiple, min_pixels=low, max_pixels=high))  # type: ignore[return-value]


# --------------------------------------------------------------------------- processor files

#: Files of a model folder that describe its processor, the video processor first: a CT goes in
#: as a video, and transformers' Qwen2.5-VL processor reads videos with the video processor.
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class ProcessorSettings:
    """What a model folder's own processor files say about the pixels the model expects.

    Every field is None when no file gives it. ``sources``: the files read, in precedence order.
    """

    sources: tuple[str, ...]
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    merge_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None


class ProcessorConfigError(ValueError):
    """A processor file cannot be read; ``file`` names it (the loader adds the folder)."""

    def __init__(self, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


def _processor_values(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of one processor JSON that matter here, validated."""
    values: dict[str, Any] = {}
    try:
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if data.get(key) is not None:
                values[key] = int(data[key])
                if values[key] < 1:
                    raise ValueError(f"{key} must be >= 1")
        size = data.get("size") if isinstance(data.get("size"), dict) else {}
        low = data.get("min_pixels", size.get("shortest_edge") if "longest_edge" in size else None)
        high = data.get("max_pixels", size.get("longest_edge"))
        if low is not None:
            values["min_pixels"] = int(low)
        if high is not None:
            values["max_pixels"] = int(high)
        if data.get("do_normalize") is False:  # the processor skips normalisation
            values["image_mean"], values["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            for key in ("image_mean", "image_std"):
                if data.get(key) is not None:
                    vector = tuple(float(v) for v in data[key])
                    if len(vector) != 3:
                        raise ValueError(f"{key} needs 3 values, got {len(vector)}")
                    values[key] = vector
            if any(v <= 0 for v in values.get("image_std", ())):
                raise ValueError("image_std must be positive")
    except (TypeError, ValueError) as err:
        raise ProcessorConfigError(name, f"invalid value ({err})") from None
    return values


def read_processor_settings(folder: str | Any) -> ProcessorSettings | None:
    """The folder's processor settings (video processor first, then the image processor), or None.

    Raises :class:`ProcessorConfigError` for a file that is not a JSON object or holds bad values.
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    merged: dict[str, Any] = {}
    sources: list[str] = []
    for name in PROCESSOR_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ProcessorConfigError(name, f"not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ProcessorConfigError(name, "not a JSON object")
        sources.append(name)
        for key, value in _processor_values(name, data).items():
            merged.setdefault(key, value)
    if not sources:
        return None
    return ProcessorSettings(sources=tuple(sources), **merged)


def check_processor_matches_vision(settings: ProcessorSettings | None, vision: Any) -> None:
    """Raise :class:`ProcessorConfigError` when the processor's patch sizes are not the vision
    tower's (``vision``: a vision config or its ``config.json`` dict)."""
    if settings is None or vision is None:
        return
    for field_name, vision_name, default in (
        ("patch_size", "patch_size", 14),
        ("temporal_patch_size", "temporal_patch_size", 2),
        ("merge_size", "spatial_merge_size", 2),
    ):
        wanted = getattr(settings, field_name)
        raw = vision.get(vision_name, default) if isinstance(vision, dict) else getattr(vision, vision_name, default)
        actual = int(raw)
        if wanted is not None and wanted != actual:
            raise ProcessorConfigError(
                settings.sources[0],
                f"{field_name} {wanted} does not match the vision tower's {vision_name} {actual} in config.json",
            )


def apply_processor_settings(config: Any, settings: ProcessorSettings | None) -> list[str]:
    """Put a folder's processor values on the model ``config`` (read by :class:`InputSettings`).

    The patch sizes must equal the vision tower's (they fix the shape of its weights): a mismatch
    raises :class:`ProcessorConfigError`. Mean / std and the pixel limits replace the config's;
    returns a note for each value that differed from what ``config.json`` held.
    """
    if settings is None:
        return []
    check_processor_matches_vision(settings, config.vision_config)
    source = settings.sources[0]
    notes: list[str] = []
    for key in ("image_mean", "image_std", "min_pixels", "max_pixels"):
        value = getattr(settings, key)
        if value is None:
            continue
        before = getattr(config, key, None)
        if key in ("image_mean", "image_std"):
            value = [float(v) for v in value]
            if before is not None and [round(float(v), 8) for v in before] != [round(v, 8) for v in value]:
                notes.append(f"{source}: {key} {value} replaces config.json's {list(before)}")
        setattr(config, key, value)
    return notes


def round_grid(grid: tuple[int, ...], depth_multiple: int, plane_multiple: int) -> tuple[int, int, int]:
    """Nearest legal model grid: depth a multiple of the temporal patch, h/w of patch*merge."""
    if len(grid) != 3:
        raise ValueError(f"volume_grid must be (depth, height, width), got {grid}")

    def nearest(value: float, multiple: int) -> int:
        return max(multiple, int(round(float(value) / multiple)) * multiple)

    depth, height, width = grid
    return (
        nearest(depth, depth_multiple),
        nearest(height, plane_multiple),
        nearest(width, plane_multiple),
    )


@dataclass
class VolumeInputs:
    """Everything the model needs about one volume, plus what maps its tokens back."""

    pixel_values_videos: torch.Tensor  # (N patches, C * tp * p * p) float32
    video_grid_thw: torch.Tensor  # (1, 3) long: (grid_t, grid_h, grid_w) in patches
    second_per_grid_ts: torch.Tensor  # (1,) float32: temporal rope step / tokens_per_second
    model_grid: tuple[int, int, int]  # (D, H, W) voxels the volume was resampled to
    source_shape: tuple[int, int, int]  # (z, y, x) of the HU array
    source_spacing: tuple[float, float, float]  # mm, (z, y, x)
    num_video_tokens: int  # LLM tokens after the 2x2 spatial merge
    mm_per_grid_step: float  # depth in mm one temporal patch covers
    settings: InputSettings
    intensity: VolumeIntensity | None = None  # the volume's kind (settings.input_intensity: the model's)

    @property
    def intensity_mismatch(self) -> bool:
        """The volume's intensities were converted to the model's kind (see the module doc)."""
        return self.intensity is not None and self.intensity.kind != self.settings.input_intensity

    def model_kwargs(self, device: Any = None, dtype: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        pixels = self.pixel_values_videos
        if device is not None or dtype is not None:
            pixels = pixels.to(device=device, dtype=dtype)
        return {
            "pixel_values_videos": pixels,
            "video_grid_thw": self.video_grid_thw.to(device) if device is not None else self.video_grid_thw,
            "second_per_grid_ts": (
                self.second_per_grid_ts.to(device) if device is not None else self.second_per_grid_ts
            ),
        }


def _as_hu_and_spacing(volume: Any, spacing: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    hu = getattr(volume, "hu", volume)
    if spacing is None:
        spacing = getattr(volume, "spacing", None)
    if spacing is None:
        raise ValueError("prepare_volume needs the voxel spacing (z, y, x) in mm for a plain array")
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) volume, got shape {hu.shape}")
    if min(hu.shape) < 1:
        raise ValueError(f"volume is empty: shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    return hu, spacing  # type: ignore[return-value]


def resample_to_grid(hu: np.ndarray, grid: tuple[int, int, int]) -> torch.Tensor:
    """HU array -> float32 tensor (D, H, W) on ``grid``: box average on shrinking axes, then trilinear.

    (A separable, chunked box average was tried to save memory traffic: it cost twice the CPU
    time of one ``adaptive_avg_pool3d`` call.)
    """
    import torch
    import torch.nn.functional as F

    if hu.dtype.kind == "b":
        hu = hu.astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(hu)).to(torch.float32)
    if hu.dtype.kind == "f":  # integer CT data cannot hold NaN; float exports sometimes do
        tensor = torch.nan_to_num(tensor, nan=AIR_HU, posinf=AIR_HU, neginf=AIR_HU)
    x = tensor[None, None]
    shrunk = tuple(min(s, g) for s, g in zip(tensor.shape, grid))
    if shrunk != tuple(tensor.shape):
        x = F.adaptive_avg_pool3d(x, shrunk)
    if tuple(x.shape[2:]) != tuple(grid):
        x = F.interpolate(x, size=grid, mode="trilinear", align_corners=False)
    return x[0, 0].contiguous()


def window_channels(hu: torch.Tensor, settings: InputSettings) -> torch.Tensor:
    """(D, H, W) HU -> (D, 3, H, W): each window to [0, 1], then the processor's mean/std."""
    import torch

    def per_channel(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

    centres = [c for c, _ in settings.ct_windows]
    widths = [w for _, w in settings.ct_windows]
    low = per_channel([c - w / 2.0 for c, w in zip(centres, widths)])
    unit = ((hu[:, None] - low) * per_channel([1.0 / w for w in widths])).clamp_(0.0, 1.0)
    return unit.sub_(per_channel(list(settings.image_mean))).div_(per_channel(list(settings.image_std)))


def unit_channels(unit: torch.Tensor, settings: InputSettings) -> torch.Tensor:
    """(D, H, W) [0, 1] display intensities -> (D, 3, H, W): the same grey in every channel (how a
    grey display image reaches an RGB model), then the processor's mean/std."""
    import torch

    channels = len(settings.image_mean)
    grey = unit.clamp(0.0, 1.0)[:, None].expand(-1, channels, -1, -1)
    mean = torch.tensor(list(settings.image_mean), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(list(settings.image_std), dtype=torch.float32).view(1, -1, 1, 1)
    return (grey - mean) / std


def model_channels(resampled: torch.Tensor, kind: str, settings: InputSettings) -> torch.Tensor:
    """(D, H, W) intensities of ``kind`` -> the (D, 3, H, W) channels of a model trained on
    ``settings.input_intensity`` (the four cases of the module doc)."""
    kind = intensity_kind(kind)
    if settings.input_intensity == INTENSITY_HU:
        hu = unit_to_hu(resampled) if kind == INTENSITY_UNIT else resampled
        return window_channels(hu, settings)
    unit = hu_to_unit(resampled) if kind == INTENSITY_HU else resampled
    return unit_channels(unit, settings)


def frames_to_patches(frames: torch.Tensor, settings: InputSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(D, C, H, W) frames -> (grid_t*grid_h*grid_w, C*tp*p*p) as Qwen2VLVideoProcessor.patchify."""
    depth, channels, height, width = frames.shape
    p, tp, m = settings.patch_size, settings.temporal_patch_size, settings.merge_size
    grid_t, grid_h, grid_w = depth // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return flat, (grid_t, grid_h, grid_w)


def patches_to_frames(
    patches: torch.Tensor, grid_thw: tuple[int, int, int], settings: InputSettings, channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`frames_to_patches`: patch rows back to (D, C, H, W) frames."""
    p, tp, m = settings.patch_size, settings.temporal_patch_size, settings.merge_size
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    blocks = patches.reshape(grid_t, grid_h // m, grid_w // m, m, m, channels, tp, p, p)
    # (t, gh/m, gw/m, mh, mw, C, tp, ph, pw) -> (t, tp, C, gh/m, mh, ph, gw/m, mw, pw)
    frames = blocks.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return frames.reshape(grid_t * tp, channels, grid_h * p, grid_w * p)


def prepare_volume(
    volume: CTVolume | np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    config: Any = None,
    *,
    volume_grid: tuple[int, int, int] | None = None,
    intensity: str | None = None,
) -> VolumeInputs:
    """Turn a CT volume (a ``CTVolume`` or a (z, y, x) array + spacing) into model inputs.

    ``config`` is the model config (TGH-MoE or plain Qwen2.5-VL); its ``vision_config`` gives
    the patch sizes and its CT fields (``volume_grid``, ``ct_windows``, ``image_mean``,
    ``image_std``, ``depth_mm_per_position``, ``input_intensity``) the rest, with the module
    defaults when absent. ``intensity`` ("hu" / "unit") overrides the volume's own kind
    (:func:`volume_intensity`); the result's ``intensity`` says which kind was used.
    """
    import torch

    hu, spacing_zyx = _as_hu_and_spacing(volume, spacing)
    settings = InputSettings.from_config(config, volume_grid=volume_grid)
    grid = settings.volume_grid
    if intensity is None:
        source_intensity = volume_intensity(volume)
    else:
        source_intensity = VolumeIntensity(intensity_kind(intensity), False, "given by the caller")
    resampled = resample_to_grid(hu, grid)
    frames = model_channels(resampled, source_intensity.kind, settings)
    patches, grid_thw = frames_to_patches(frames, settings)

    depth_extent_mm = hu.shape[0] * spacing_zyx[0]
    mm_per_grid_step = settings.temporal_patch_size * depth_extent_mm / grid[0]
    if settings.depth_mm_per_position is None:
        positions_per_step = 1.0
    else:
        positions_per_step = mm_per_grid_step / settings.depth_mm_per_position
    seconds = positions_per_step / settings.tokens_per_second * _TRUNCATION_GUARD
    grid_t, grid_h, grid_w = grid_thw
    return VolumeInputs(
        pixel_values_videos=patches,
        video_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long),
        second_per_grid_ts=torch.tensor([seconds], dtype=torch.float32),
        model_grid=grid,
        source_shape=tuple(int(s) for s in hu.shape),  # type: ignore[arg-type]
        source_spacing=spacing_zyx,
        num_video_tokens=grid_t * grid_h * grid_w // settings.merge_size**2,
        mm_per_grid_step=mm_per_grid_step,
        settings=settings,
        intensity=source_intensity,
    )
