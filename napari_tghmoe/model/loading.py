"""Load a TGH-MoE (or plain Qwen2.5-VL) model folder safely, offline, quantized to fit.

Rules: safetensors only (pickle checkpoints can run code on load, so ``.bin``/``.pt`` are
refused), local files only, never ``trust_remote_code``. On CUDA the LLM goes to
bitsandbytes 4-bit nf4 by default while the vision tower, experts, routers, merger and
``lm_head`` stay in bf16 (they are small and the routing maps need their precision); on the
CPU weights stay fp32 (or bf16 when asked) because 4-bit matmuls are several times slower
there, and bitsandbytes is used only when asked. When the GPU lacks memory the loader warns
and falls back (4-bit, then CPU) instead of dying: the choice is the pure function
:func:`choose_plan`, tested with a fake memory probe. A model that fits nowhere is refused
before any weight is read (:mod:`napari_tghmoe.model.memory`): one line naming the folder, the
memory needed and the memory free, rather than the out-of-memory killer taking the viewer down.

A folder is answered with its own chat template and processor settings: the processor's
``chat_template.json`` (else ``chat_template.jinja``, else the tokenizer's template) becomes the
tokenizer's template, and ``video_preprocessor_config.json`` / ``preprocessor_config.json``
(mean / std, pixel limits; patch sizes checked against the vision tower) go onto the config that
``prepare_volume`` reads. A folder written by ``tghmoe convert`` that refers to its base folder
(:mod:`napari_tghmoe.model.base_ref`) is checked, counted and hashed with the base's weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QWEN_MODEL_TYPE = "qwen2_5_vl"
#: model_type of the TGH-MoE TGHMoEConfig (read from it when importable).
DEFAULT_TGHMOE_MODEL_TYPE = "tghmoe_qwen2_5_vl"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
#: Module name patterns bitsandbytes must leave unquantized (matched at a module boundary,
#: as a regex from the start, or as a suffix: see transformers' ``should_convert_module``).
BNB_SKIP_MODULES = [
    "model.visual", "visual", "lm_head", r".*\.lora_\w+", r".*router\w*", r".*experts?", "volume_projector",
]
QUANTIZATIONS = ("auto", "4bit", "8bit", "none")
GIB = 1024**3
#: Every weight load: local files only, and no kernels from the Hub (transformers >= 5.25
#: kernelizes models by default, which would fetch code at run time).
OFFLINE_LOAD_KWARGS: dict[str, Any] = {"local_files_only": True, "use_kernels": False}


class ModelLoadError(RuntimeError):
    """A model folder cannot be loaded; ``str(err)`` is one line: the folder and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelLoadWarning(UserWarning):
    """Loading worked but not as asked (fresh experts, memory fallback...)."""


@dataclass(frozen=True)
class LoadPlan:
    """Where and how the weights go."""

    device: str  # "cpu", "cuda", "cuda:1"...
    quantization: str  # "4bit", "8bit", "none"
    dtype: str  # dtype of the unquantized parts: "float32", "bfloat16", "float16"

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the LLM body (quantizable) and of everything else (kept in full precision)."""

    llm: int
    other: int

    @property
    def total(self) -> int:
        return self.llm + self.other


@dataclass
class LoadInfo:
    """What was loaded and how, for the UI, the Answer and the report provenance."""

    path: str
    model_name: str
    device: str
    quantization: str
    dtype: str
    is_tghmoe: bool
    adapted_from_base: bool
    weights_sha256: str | None
    parameters: int
    warnings: list[str] = field(default_factory=list)
    base_path: str | None = None  # the base folder a converted TGH-MoE folder refers to
    chat_template_source: str | None = None  # file the chat template came from
    processor_sources: tuple[str, ...] = ()  # processor files whose settings were applied
    memory: Any = None  # the FitReport checked before loading (None: not checked)

    @property
    def precision(self) -> str:
        """Short label like "4bit nf4 + bfloat16" or "float32"."""
        if self.quantization == "4bit":
            return f"LLM 4bit nf4, rest {self.dtype}"
        if self.quantization == "8bit":
            return f"LLM 8bit, rest {self.dtype}"
        return self.dtype


@dataclass
class LoadedModel:
    """``load_model``'s result; unpacks as ``model, tokenizer, info``."""

    model: Any
    tokenizer: Any
    info: LoadInfo

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.info))


# --------------------------------------------------------------------------- planning (pure)


def resolve_plan(device: str, quantization: str, dtype: Any, cuda_available: bool) -> LoadPlan:
    """Turn the user's "auto" choices into a concrete plan (no memory check yet)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise ValueError("CUDA was asked for but no CUDA device is available")
    on_cuda = device.startswith("cuda")
    if quantization == "auto":
        quantization = "4bit" if on_cuda else "none"
    dtype_name = _dtype_name(dtype) if dtype is not None else ("bfloat16" if on_cuda else "float32")
    return LoadPlan(device=device, quantization=quantization, dtype=dtype_name)


def estimate_memory_bytes(counts: ParameterCounts, plan: LoadPlan, headroom_bytes: int = GIB) -> int:
    """Bytes the weights need under ``plan`` plus headroom for activations and the KV cache."""
    full = {"float32": 4, "bfloat16": 2, "float16": 2}[plan.dtype]
    per_llm_param = {"none": full, "8bit": 1.06, "4bit": 0.53}[plan.quantization]  # + absmax/scales
    return int(counts.llm * per_llm_param + counts.other * full + headroom_bytes)


def fallback_chain(plan: LoadPlan) -> list[LoadPlan]:
    """Plans to try in order: the asked one, then 4-bit on the same GPU, then the CPU."""
    chain = [plan]
    if plan.on_cuda:
        if plan.quantization != "4bit":
            chain.append(replace(plan, quantization="4bit"))
        chain.append(LoadPlan(device="cpu", quantization="none", dtype="float32"))
    return chain


def choose_plan(
    requested: LoadPlan,
    counts: ParameterCounts,
    free_gpu_bytes: int | None,
    headroom_bytes: int = GIB,
) -> tuple[LoadPlan, list[str]]:
    """First plan of :func:`fallback_chain` that fits the free GPU memory, with warnings.

    ``free_gpu_bytes`` None means "unknown" (no probe): the requested plan is kept and a real
    out-of-memory error during loading falls back the same way.
    """
    messages: list[str] = []
    if not requested.on_cuda or free_gpu_bytes is None:
        return requested, messages
    for candidate in fallback_chain(requested):
        if not candidate.on_cuda:
            messages.append(
                f"not enough GPU memory ({free_gpu_bytes / GIB:.1f} GiB free) even in 4-bit: "
                "loading on the CPU instead (slow)"
            )
            return candidate, messages
        need = estimate_memory_bytes(counts, candidate, headroom_bytes)
        if need <= free_gpu_bytes:
            if candidate != requested:
                messages.append(
                    f"not enough GPU memory for {requested.quantization} "
                    f"({free_gpu_bytes / GIB:.1f} GiB free): using {candidate.quantization} instead"
                )
            return candidate, messages
    raise AssertionError("fallback_chain always ends on the CPU")  # pragma: no cover


# --------------------------------------------------------------------------- folder checks


def tghmoe_model_type() -> str:
    try:
        from napari_tghmoe.model.configuration import TGHMoEConfig
    except ImportError:
        return DEFAULT_TGHMOE_MODEL_TYPE
    return getattr(TGHMoEConfig, "model_type", DEFAULT_TGHMOE_MODEL_TYPE)


@dataclass(frozen=True)
class FolderCheck:
    """What :func:`check_model_folder` found."""

    path: Path
    config: dict
    model_type: str
    is_tghmoe: bool
    weight_files: tuple[Path, ...]  # every weight file the model reads (the base's too)
    base: Any = None  # BaseReference of a folder that refers to its base, else None


def check_model_folder(path: str | Path) -> FolderCheck:
    """Fail fast, with one clear line, on anything that would make loading fail or unsafe."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(folder, "model folder not found")
    if not folder.is_dir():
        raise ModelLoadError(folder, "not a folder (give the model folder, not a file inside it)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(folder, "no config.json: not a transformers model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(folder, f"config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(folder, "config.json is not a JSON object")
    model_type = str(config.get("model_type", ""))
    tgh_type = tghmoe_model_type()
    if model_type not in (QWEN_MODEL_TYPE, tgh_type):
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ModelLoadError(
            folder,
            f"wrong architecture: config.json describes a {model_type or 'untyped'!r} model ({arch}); "
            f"expected Qwen2.5-VL ({QWEN_MODEL_TYPE}) or TGH-MoE ({tgh_type})",
        )
    weights = tuple(sorted(folder.glob("*.safetensors")))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                folder,
                f"only pickle checkpoints found ({', '.join(pickles)}): refused because loading "
                "pickle can run arbitrary code; convert the weights to .safetensors",
            )
        raise ModelLoadError(folder, "no .safetensors weights found")
    _check_shards(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(folder, f"no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    is_tghmoe = model_type == tgh_type
    base = _check_base_reference(folder) if is_tghmoe else None
    if base is not None:
        weights = weights + base.base_weight_paths
    if is_tghmoe and config.get("volume_encoder"):
        weights = weights + _check_volume_encoder(folder, str(config["volume_encoder"]))
    return FolderCheck(folder, config, model_type, is_tghmoe, weights, base)


def _check_volume_encoder(folder: Path, name: str) -> tuple[Path, ...]:
    """The 3D encoder sub-folder config.json names: a Med3DInsight segmentation model (its weights
    count, and are hashed, with the model's)."""
    from napari_tghmoe.med3d.encoder import SEG_ARCHITECTURE, read_folder_config
    from napari_tghmoe.med3d.types import SegModelError

    try:
        read_folder_config(folder / name, SEG_ARCHITECTURE)
    except SegModelError as err:
        raise ModelLoadError(folder, f"volume encoder: {err}") from None
    return ((folder / name / "model.safetensors"),)


def _check_base_reference(folder: Path) -> Any:
    """The base a converted folder refers to, with every base file present and unchanged in size."""
    from napari_tghmoe.model.base_ref import BaseReferenceError, read_base_reference, verify_base_files

    try:
        reference = read_base_reference(folder)
        if reference is None:
            return None
        verify_base_files(reference)
    except BaseReferenceError as err:
        raise ModelLoadError(folder, str(err)) from None
    _check_shards(reference.base_path)
    return reference


def _check_shards(folder: Path) -> None:
    """A sharded checkpoint must have every shard its index lists (a copy cut short, a failed download)."""
    index_file = folder / "model.safetensors.index.json"
    if not index_file.is_file():
        return
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(folder, f"{index_file.name} is not a valid shard index ({type(err).__name__}: {err})") from None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            folder,
            f"{len(missing)} of {len(shards)} weight shard(s) missing: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} (listed in {index_file.name}); copy the whole folder again",
        )


def count_parameters(weight_files: tuple[Path, ...]) -> ParameterCounts:
    """Parameter counts from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    llm = other = 0
    for file in weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= int(dim)
                if _is_llm_body_key(key):
                    llm += numel
                else:
                    other += numel
    return ParameterCounts(llm=llm, other=other)


def _is_llm_body_key(key: str) -> bool:
    """Decoder-layer weights of the LLM (what bitsandbytes quantizes), in old or new key layout."""
    in_layers = key.startswith("model.layers.") or ".language_model.layers." in key or key.startswith(
        "language_model.layers."
    )
    return in_layers and "lora" not in key


def weights_digest(check: FolderCheck) -> str:
    """Provenance digest of the weights a folder loads.

    A folder holding its weights: :func:`sha256_of_files` of them. A folder that refers to its
    base: the base files are hashed and compared with the digest recorded at conversion (a base
    replaced by another model with the same file sizes is refused), then the digest covers the
    base's digest and the folder's own weight files.
    """
    if check.base is None:
        return sha256_of_files(check.weight_files)
    base_files = check.base.base_weight_paths
    base_digest = sha256_of_files(base_files)
    if check.base.weights_sha256 and base_digest != check.base.weights_sha256:
        raise ModelLoadError(
            check.path,
            f"the base weights in {check.base.base_path} changed since conversion (sha256 differs): "
            "the experts were added to another model; run tghmoe convert again",
        )
    own = tuple(f for f in check.weight_files if f not in base_files)
    digest = hashlib.sha256(f"base:{base_digest}\n".encode())
    digest.update(sha256_of_files(own).encode())
    return digest.hexdigest()


def sha256_of_files(files: tuple[Path, ...], chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """One digest over the weight files in name order (provenance for reports)."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def cuda_free_bytes(device: str) -> int | None:
    """Free memory on a CUDA device, or None when it cannot be measured."""
    try:
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except Exception:  # noqa: BLE001 - any failure means "unknown", the OOM fallback still holds
        return None


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- loading


def load_with_fallback(
    candidates: list[LoadPlan], load_one: Callable[[LoadPlan], Any], notes: list[str]
) -> tuple[Any, LoadPlan]:
    """``load_one`` on each plan in turn while a GPU plan runs out of memory; other errors propagate.

    The memory estimate of :func:`choose_plan` can be wrong (fragmentation, another process), so a
    real CUDA out-of-memory error while loading moves on to the next plan with a note.
    """
    for index, candidate in enumerate(candidates):
        try:
            return load_one(candidate), candidate
        except (RuntimeError, MemoryError) as err:
            last = index + 1 == len(candidates)
            if last or not candidate.on_cuda or not _is_out_of_memory(err):
                raise
            following = candidates[index + 1]
            notes.append(
                f"out of GPU memory loading with {candidate.quantization}: "
                f"retrying with {following.quantization} on {following.device}"
            )
            _free_cuda_cache()
    raise ValueError("no load plan to try")


def _free_cuda_cache() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - nothing to free without CUDA
        pass


def _quantization_config(plan: LoadPlan):
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, plan.dtype)
    if plan.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=list(BNB_SKIP_MODULES),
        )
    if plan.quantization == "8bit":
        # bitsandbytes warns on every CPU 8-bit matmul that it casts to float16; once is enough
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(BNB_SKIP_MODULES))
    return None


def _model_classes(path: str | Path):
    """(TGH-MoE class, adapt function, plain Qwen2.5-VL class).

    A failed import of the TGH-MoE classes is an error, never a silent plain Qwen2.5-VL without
    routing: the user would get answers that look right from a model that is not the one asked for.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    try:
        from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration, adapt_2d_mllm
    except ImportError as err:
        raise ModelLoadError(
            path, f"the TGH-MoE model classes could not be imported ({type(err).__name__}: {err})"
        ) from err
    return TGHMoEForConditionalGeneration, adapt_2d_mllm, Qwen2_5_VLForConditionalGeneration


def _load_weights(check: FolderCheck, plan: LoadPlan, adapt: bool, moe_config: Any = None):
    import torch

    tgh_class, adapt_fn, qwen_class = _model_classes(check.path)
    kwargs: dict[str, Any] = {
        **OFFLINE_LOAD_KWARGS,
        "use_safetensors": True,
        "dtype": getattr(torch, plan.dtype),
        "device_map": {"": plan.device},
    }
    quantization_config = _quantization_config(plan)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if check.is_tghmoe:
        return tgh_class.from_pretrained(str(check.path), **kwargs), False
    model = qwen_class.from_pretrained(str(check.path), **kwargs)
    if adapt:
        return adapt_fn(model, moe_config), True
    return model, False


def load_model(
    path: str | Path,
    device: str = "auto",
    quantization: str = "auto",
    dtype: Any = None,
    *,
    adapt: bool = True,
    moe_config: Any = None,
    hash_weights: bool = True,
    memory_probe: Callable[[str], int | None] | None = None,
    check_memory: bool = True,
) -> LoadedModel:
    """Load a TGH-MoE folder (or a plain Qwen2.5-VL folder, given fresh experts) for inference.

    ``device``: "auto" (CUDA when present), "cpu", "cuda", "cuda:N". ``quantization``:
    "auto" (4bit on CUDA, none on CPU), "4bit", "8bit", "none". ``dtype`` of the unquantized
    parts (default bf16 on CUDA, fp32 on CPU). ``adapt=False`` keeps a plain Qwen2.5-VL
    folder unadapted (benchmarks). ``memory_probe(device) -> free bytes or None`` replaces
    :func:`napari_tghmoe.model.memory.available_bytes` (tests). ``check_memory=False`` skips the
    refusal of a model that does not fit in RAM. Raises :class:`ModelLoadError` with one line
    naming the folder and reason.
    """
    import torch
    from transformers import AutoTokenizer

    from napari_tghmoe.model import memory

    check = check_model_folder(path)
    plan = resolve_plan(device, quantization, dtype, torch.cuda.is_available())
    notes: list[str] = []

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(check.path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is a folder problem
        raise ModelLoadError(check.path, f"tokenizer cannot be loaded ({type(err).__name__}: {err})") from None
    _check_tokenizer_matches(check, tokenizer)
    template_source = _apply_folder_chat_template(check.path, tokenizer)
    processor = _read_processor(check.path, check.config.get("vision_config"))

    try:
        counts = count_parameters(check.weight_files)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        raise ModelLoadError(check.path, f"weights cannot be read: not valid safetensors ({err})") from None
    probe = memory_probe or memory.available_bytes
    if plan.on_cuda:
        cuda_runtime = memory.estimate_for(check.config, counts, plan)
        plan, messages = choose_plan(plan, counts, probe(plan.device), headroom_bytes=cuda_runtime.runtime_bytes)
        notes.extend(messages)
    fit = None
    if check_memory and not plan.on_cuda:
        fit = memory.fit_report(check.path, check.config, counts, plan, probe(plan.device))
        if not fit.fits:
            raise ModelLoadError(check.path, fit.message)
    digest = weights_digest(check) if hash_weights else None  # before loading: a replaced base fails fast

    try:
        (model, adapted), plan = load_with_fallback(
            fallback_chain(plan), lambda candidate: _load_weights(check, candidate, adapt, moe_config), notes
        )
    except ModelLoadError:
        raise
    except (RuntimeError, MemoryError, OSError, ValueError, KeyError, ImportError) as err:
        raise ModelLoadError(check.path, f"weights cannot be loaded ({type(err).__name__}: {err})") from None
    notes.extend(_apply_processor(check.path, model.config, processor))
    if adapted:
        notes.append(
            "plain Qwen2.5-VL folder: TGH-MoE experts added with fresh (untrained) weights; "
            "answers equal the base model's until the experts are trained (tghmoe convert / train)"
        )
    for note in notes:
        warnings.warn(note, ModelLoadWarning, stacklevel=2)
        logger.info("%s: %s", check.path, note)
    model.eval()

    info = LoadInfo(
        path=str(check.path),
        model_name=check.path.name,
        device=plan.device,
        quantization=plan.quantization,
        dtype=plan.dtype,
        is_tghmoe=check.is_tghmoe or adapted,
        adapted_from_base=adapted,
        weights_sha256=digest,
        parameters=counts.total,
        warnings=notes,
        base_path=str(check.base.base_path) if check.base is not None else None,
        chat_template_source=template_source,
        processor_sources=processor.sources if processor is not None else (),
        memory=fit,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _apply_folder_chat_template(folder: Path, tokenizer: Any) -> str | None:
    """Give the tokenizer the folder's own chat template; return the file it came from."""
    from napari_tghmoe.model.tokenizer import ChatTemplateError, folder_chat_template

    try:
        found = folder_chat_template(folder)
    except ChatTemplateError as err:
        raise ModelLoadError(folder, str(err)) from None
    if found is not None:
        tokenizer.chat_template, source = found
        return source
    return "tokenizer_config.json" if getattr(tokenizer, "chat_template", None) else None


def _read_processor(folder: Path, vision: Any) -> Any:
    """The folder's processor settings, checked against the vision tower before any weight is read."""
    from napari_tghmoe.model.preprocess import (
        ProcessorConfigError,
        check_processor_matches_vision,
        read_processor_settings,
    )

    try:
        settings = read_processor_settings(folder)
        check_processor_matches_vision(settings, vision if isinstance(vision, dict) else {})
        return settings
    except ProcessorConfigError as err:
        raise ModelLoadError(folder, str(err)) from None


def _apply_processor(folder: Path, config: Any, processor: Any) -> list[str]:
    from napari_tghmoe.model.preprocess import ProcessorConfigError, apply_processor_settings

    try:
        return apply_processor_settings(config, processor)
    except ProcessorConfigError as err:
        raise ModelLoadError(folder, str(err)) from None


def _check_tokenizer_matches(check: FolderCheck, tokenizer: Any) -> None:
    """The tokenizer must spell the model's video token with the model's id."""
    video_id = check.config.get("video_token_id")
    if video_id is None:
        return
    actual = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    if actual != video_id:
        raise ModelLoadError(
            check.path,
            f"tokenizer does not match the model: <|video_pad|> is id {actual}, config says {video_id}",
        )
