"""Will this model fit? Estimate the memory a model folder needs and compare it with what is free.

Loading a model that does not fit ends, on the CPU, in the kernel's out-of-memory killer: the
napari window vanishes with the user's work. So the loader asks :func:`check_fits` first and
refuses with one clear line (:class:`~napari_tghmoe.model.loading.ModelLoadError`) instead. Pure
Python: the estimate reads only ``config.json`` and the safetensors headers (no tensor), the free
memory comes from psutil (and the cgroup limit of a container) or ``torch.cuda.mem_get_info``.

The estimate is weights + what running needs (KV cache, the vision tower's and the LLM's
activations for the model's volume grid) + a margin; its constants were checked against the
peak memory measured by ``benchmarks/bench_real_size.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
#: Precision names (what the user picks) -> (quantization of the LLM body, dtype of the rest;
#: None = the device's default: bfloat16 on CUDA, float32 on the CPU).
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp32": ("none", "float32"),
    "bf16": ("none", "bfloat16"),
    "fp16": ("none", "float16"),
    "int8": ("8bit", None),
    "nf4": ("4bit", None),
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Bytes per LLM-body parameter under bitsandbytes (weights + absmax / row scales).
_QUANTIZED_BYTES = {"8bit": 1.06, "4bit": 0.53}
#: Text tokens of a prompt besides the video (chat template, question) and answer tokens.
PROMPT_TEXT_TOKENS = 128
DEFAULT_MAX_NEW_TOKENS = 256
#: Margin on top of the estimate: allocator slack and the loader's transient per-tensor copies.
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 256 * MIB
#: bitsandbytes on the CPU quantizes while loading and dequantizes in the prefill: measured on the
#: 3B (benchmarks/bench_real_size.py), the peak rises by up to about this many decoder layers in the
#: compute dtype above weights + activations (nf4: +1.2 GiB, int8: +0.5 GiB for 3B in fp32).
CPU_QUANTIZED_EXTRA_LAYERS = 5


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs on one device, split so a message can say where they go."""

    weights_bytes: int
    runtime_bytes: int  # KV cache + activations + margin

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.runtime_bytes


@dataclass(frozen=True)
class FitReport:
    """:func:`check_fits`' answer. ``message`` is one line for the user."""

    model_dir: str
    device: str  # "cpu", "cuda", "cuda:1"
    precision: str  # "fp32", "bf16", "fp16", "int8", "nf4"
    needed_bytes: int
    available_bytes: int | None  # None: unknown (no probe), taken as fitting
    weights_bytes: int
    fits: bool
    message: str
    alternatives: tuple[str, ...] = ()  # other precisions that would fit on this device


# --------------------------------------------------------------------------- precision <-> plan


def plan_for_precision(precision: str, device: str = "auto", cuda_available: bool | None = None):
    """The :class:`~napari_tghmoe.model.loading.LoadPlan` of a precision name on ``device``."""
    from napari_tghmoe.model.loading import resolve_plan

    if cuda_available is None:
        cuda_available = _cuda_available()
    if precision == "auto":
        return resolve_plan(device, "auto", None, cuda_available)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {tuple(PRECISIONS)}, got {precision!r}")
    quantization, dtype = PRECISIONS[precision]
    return resolve_plan(device, quantization, dtype, cuda_available)


def precision_of(plan: Any) -> str:
    """Short precision name of a load plan ("nf4", "int8", "bf16", ...)."""
    if plan.quantization == "4bit":
        return "nf4"
    if plan.quantization == "8bit":
        return "int8"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[plan.dtype]


# --------------------------------------------------------------------------- estimate (pure)


def _text_field(config: dict, name: str, default: Any = None) -> Any:
    """A text-model field in either config layout (nested ``text_config`` or Qwen's flat one)."""
    text = config.get("text_config") or {}
    return text.get(name, config.get(name, default))


def runtime_bytes(config: dict, plan: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """KV cache + peak activations of one answer on the model's volume grid, in bytes.

    From ``config.json`` alone: the vision tower runs over every patch of the grid (its MLP is the
    widest activation), the LLM prefills the video tokens plus the prompt (MLP activations and, on
    the CPU, the attention scores, which SDPA's math path materialises) and caches keys / values
    for the prompt and the answer.
    """
    from napari_tghmoe.model.preprocess import DEFAULT_VOLUME_GRID, round_grid

    act = _DTYPE_BYTES[plan.dtype]
    vision = config.get("vision_config") or {}
    patch = int(vision.get("patch_size", 14))
    temporal = int(vision.get("temporal_patch_size", 2))
    merge = int(vision.get("spatial_merge_size", 2))
    v_hidden = int(vision.get("hidden_size", 1280))
    v_inter = int(vision.get("intermediate_size", 4 * v_hidden))
    depth, height, width = round_grid(config.get("volume_grid") or DEFAULT_VOLUME_GRID, temporal, patch * merge)
    patches = (depth // temporal) * (height // patch) * (width // patch)
    video_tokens = patches // (merge * merge)

    hidden = int(_text_field(config, "hidden_size", 2048))
    inter = int(_text_field(config, "intermediate_size", 4 * hidden))
    layers = int(_text_field(config, "num_hidden_layers", 1))
    heads = int(_text_field(config, "num_attention_heads", 1))
    kv_heads = int(_text_field(config, "num_key_value_heads", heads))
    head_dim = int(_text_field(config, "head_dim", 0) or hidden // heads)
    sequence = video_tokens + PROMPT_TEXT_TOKENS + max_new_tokens

    kv_cache = layers * 2 * kv_heads * head_dim * sequence * act
    vision_peak = patches * (3 * v_inter + 8 * v_hidden) * act
    llm_peak = sequence * (3 * inter + 6 * hidden) * act
    quantized_extra = 0
    if not plan.on_cuda:
        llm_peak += heads * sequence * sequence * 4
        if plan.quantization != "none":
            layer = 3 * hidden * inter + 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
            quantized_extra = CPU_QUANTIZED_EXTRA_LAYERS * layer * act
    return int(kv_cache + max(vision_peak, llm_peak) + quantized_extra)


def weights_bytes(counts: Any, plan: Any) -> int:
    """Bytes of the weights under ``plan``: the LLM body quantized (if asked), the rest in dtype."""
    full = _DTYPE_BYTES[plan.dtype]
    llm = _QUANTIZED_BYTES.get(plan.quantization, full)
    return int(counts.llm * llm + counts.other * full)


def estimate_for(config: dict, counts: Any, plan: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> MemoryEstimate:
    """The estimate from a parsed ``config.json`` and parameter counts (pure; used by the loader)."""
    weights = weights_bytes(counts, plan)
    runtime = runtime_bytes(config, plan, max_new_tokens)
    margin = int(MARGIN_FRACTION * weights) + MARGIN_BYTES
    return MemoryEstimate(weights_bytes=weights, runtime_bytes=runtime + margin)


def estimate_load_bytes(
    model_dir: str | Path, precision: str = "auto", device: str = "auto", *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> int:
    """Bytes ``model_dir`` needs loaded in ``precision`` on ``device`` and answering one question.

    Reads ``config.json`` and the safetensors headers (for a folder that refers to its base, the
    base's too); raises :class:`~napari_tghmoe.model.loading.ModelLoadError` for a bad folder.
    """
    check, counts = _folder_counts(model_dir)
    plan = plan_for_precision(precision, device)
    return estimate_for(check.config, counts, plan, max_new_tokens).total_bytes


def _folder_counts(model_dir: str | Path):
    from napari_tghmoe.model.loading import ModelLoadError, check_model_folder, count_parameters

    check = check_model_folder(model_dir)
    try:
        counts = count_parameters(check.weight_files)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        raise ModelLoadError(check.path, f"weights cannot be read: not valid safetensors ({err})") from None
    return check, counts


# --------------------------------------------------------------------------- free memory


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


#: (limit, usage) files of the process's memory cgroup: v2, then v1.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def cgroup_free_bytes(candidates: tuple[tuple[str, str], ...] = CGROUP_FILES) -> int | None:
    """Room left under the container's memory limit, or None without one (psutil sees the host)."""
    for limit_file, usage_file in candidates:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            return None
        return max(0, int(limit_text) - usage)
    return None


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free for a new model on ``device`` ("cpu", "cuda", "cuda:N"); None when unknown.

    CPU: psutil's ``available`` (free + reclaimable cache), capped by the cgroup limit of a
    container. CUDA: the driver's free memory on that device (``torch.cuda.mem_get_info``).
    """
    if device.startswith("cuda"):
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - any failure means "unknown"
            return None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return None
    room = cgroup_free_bytes()
    return free if room is None else min(free, room)


# --------------------------------------------------------------------------- the check


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _device_words(device: str) -> str:
    return "the CPU (RAM)" if device == "cpu" else f"GPU {device}"


def fit_report(
    model_dir: str | Path,
    config: dict,
    counts: Any,
    plan: Any,
    available: int | None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> FitReport:
    """:class:`FitReport` for a plan from parsed inputs (pure: the loader and :func:`check_fits` share it)."""
    estimate = estimate_for(config, counts, plan, max_new_tokens)
    precision = precision_of(plan)
    needed = estimate.total_bytes
    fits = available is None or needed <= available
    alternatives: list[str] = []
    if not fits:
        for name in PRECISIONS:
            if name == precision or (name == "fp16" and not plan.on_cuda):
                continue
            other = plan_for_precision(name, plan.device, cuda_available=plan.on_cuda)
            if estimate_for(config, counts, other, max_new_tokens).total_bytes <= available:
                alternatives.append(name)
    where = _device_words(plan.device)
    free = "free memory unknown" if available is None else f"{_gib(available)} free"
    if fits:
        message = f"fits: {precision} on {where} needs about {_gib(needed)}, {free}"
    else:
        hint = f"; {' or '.join(alternatives)} would fit" if alternatives else "; no precision fits: close other programs or use a smaller model"
        message = (
            f"not enough memory to load it in {precision} on {where}: needs about {_gib(needed)} "
            f"(weights {_gib(estimate.weights_bytes)} + {_gib(estimate.runtime_bytes)} to run), {free}{hint}"
        )
    return FitReport(
        model_dir=str(model_dir),
        device=plan.device,
        precision=precision,
        needed_bytes=needed,
        available_bytes=available,
        weights_bytes=estimate.weights_bytes,
        fits=fits,
        message=message,
        alternatives=tuple(alternatives),
    )


def check_fits(
    model_dir: str | Path,
    precision: str = "auto",
    device: str = "auto",
    *,
    available: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> FitReport:
    """Would ``model_dir`` fit in ``precision`` on ``device`` now? (``available`` overrides the probe.)

    ``precision``: "auto" (nf4 on CUDA, fp32 on the CPU, as the loader picks) or one of
    :data:`PRECISIONS`. Raises ``ModelLoadError`` for a folder that is not a model, ``ValueError``
    for an unknown precision or CUDA asked without a GPU.
    """
    check, counts = _folder_counts(model_dir)
    plan = plan_for_precision(precision, device)
    free = available if available is not None else available_bytes(plan.device)
    return fit_report(check.path, check.config, counts, plan, free, max_new_tokens)


def check_fits_for_options(
    model_dir: str | Path,
    device: str = "auto",
    quantization: str = "auto",
    dtype: Any = None,
    *,
    available: int | None = None,
    **_ignored: Any,
) -> FitReport:
    """:func:`check_fits` for ``InferenceEngine.from_pretrained`` load options (the chat dock's
    device choices: ``check_fits_for_options(folder, **DEVICE_CHOICES[name])``)."""
    from napari_tghmoe.model.loading import resolve_plan

    check, counts = _folder_counts(model_dir)
    plan = resolve_plan(device, quantization, dtype, _cuda_available())
    free = available if available is not None else available_bytes(plan.device)
    return fit_report(check.path, check.config, counts, plan, free)
