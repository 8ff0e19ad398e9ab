"""``tghmoe convert``: a plain Qwen2.5-VL folder -> a TGH-MoE checkpoint folder.

By default the new folder refers to the base instead of copying it (:mod:`napari_tghmoe.model.base_ref`):
the base is built on the meta device (no base weight is read, so converting the 3B model takes
seconds and no memory), ``adapt_2d_mllm`` adds the experts, routers and LoRA beside it, and only
those new tensors are saved (``tghmoe_adapter.safetensors``), with the TGH-MoE ``config.json``, a
``tghmoe_base.json`` naming the base folder, and copies of the small tokenizer / processor /
chat-template / generation files so the folder describes itself. The base folder is only read
(its headers, and its weight files once for a digest), never written. ``standalone=True``
(``--standalone``) writes the old self-contained folder instead: every base tensor saved beside
the experts, for a folder that must travel without its base.

The processor's mean / std and pixel limits (``preprocessor_config.json``) are written into the
TGH-MoE config, so the CT reaches the vision tower normalised the way the base was trained.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

#: Files beside the weights that a model folder needs to be used (copied verbatim).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def convert_checkpoint(
    base: str | Path,
    out: str | Path,
    moe_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    *,
    standalone: bool = False,
    hash_base: bool = True,
) -> Path:
    """Write a TGH-MoE checkpoint for the Qwen2.5-VL folder ``base`` into ``out``; return ``out``.

    ``standalone``: save every base tensor too (a self-contained folder) instead of referring to
    ``base``. ``hash_base``: record a digest of the base weights, checked when the folder is
    loaded with hashing on. Raises ``ModelLoadError`` for a bad base folder and ``FileExistsError``
    when ``out`` holds files and ``overwrite`` is False. The folder appears complete or not at all
    (staged, then renamed).
    """
    from napari_tghmoe.model.loading import ModelLoadError, check_model_folder, sha256_of_files
    from napari_tghmoe.model.preprocess import ProcessorConfigError, read_processor_settings

    check = check_model_folder(base)
    if check.is_tghmoe:
        raise ModelLoadError(check.path, "already a TGH-MoE checkpoint: nothing to convert")
    out = checked_output_folder(out, check.path, overwrite=overwrite, source_kind="base")
    try:
        processor = read_processor_settings(check.path)
    except ProcessorConfigError as err:
        raise ModelLoadError(check.path, str(err)) from None
    settings = _processor_defaults(processor)
    settings.update(moe_config or {})

    with staged_output_folder(out, copy_small_files_from=check.path) as staging:
        if standalone:
            _save_standalone(check.path, staging, settings)
        else:
            _save_adapter_only(check.path, staging, settings)
            digest = sha256_of_files(check.weight_files) if hash_base else None
            from napari_tghmoe.model.base_ref import write_base_reference

            write_base_reference(staging, check.path, check.weight_files, digest, final_folder=out)
    return out


def checked_output_folder(out: str | Path, source: Path, *, overwrite: bool, source_kind: str) -> Path:
    """``out`` as a path a model folder may be written to: empty or ``overwrite``, not ``source``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty (use --overwrite)")
    if out.resolve() == source.resolve():
        raise FileExistsError(f"{out}: the output folder must differ from the {source_kind} folder")
    return out


@contextlib.contextmanager
def staged_output_folder(out: Path, *, copy_small_files_from: Path) -> Iterator[Path]:
    """A staging folder beside ``out``, renamed to ``out`` when the block ends without an error, so
    ``out`` appears complete or not at all. The source's tokenizer, processor and template files
    (:data:`COPIED_FILES`) the block did not write itself are copied in first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        for name in COPIED_FILES:
            source = copy_small_files_from / name
            if source.is_file() and not (staging / name).exists():
                shutil.copy2(source, staging / name)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _processor_defaults(processor: Any) -> dict[str, Any]:
    """TGH-MoE settings taken from the base's processor files (the user's flags override them)."""
    if processor is None:
        return {}
    values = {
        "image_mean": list(processor.image_mean) if processor.image_mean else None,
        "image_std": list(processor.image_std) if processor.image_std else None,
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
    }
    return {key: value for key, value in values.items() if value is not None}


def _save_adapter_only(base: Path, staging: Path, settings: dict[str, Any]) -> None:
    """Build the base without weights, add the experts, save their tensors and the config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from napari_tghmoe.model.loading import ModelLoadError
    from napari_tghmoe.model.modeling import adapt_2d_mllm, save_adapter_weights

    from napari_tghmoe.model.base_ref import ADAPTER_WEIGHTS_FILE

    try:
        base_config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(base, f"config.json cannot be read ({type(err).__name__}: {err})") from None
    with init_empty_weights():  # parameters on the meta device: nothing is allocated or read
        skeleton = Qwen2_5_VLForConditionalGeneration(base_config)
    model = adapt_2d_mllm(skeleton, settings, match_base_placement=False)  # new modules: CPU, fp32
    save_adapter_weights(model, staging / ADAPTER_WEIGHTS_FILE)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)


def _save_standalone(base: Path, staging: Path, settings: dict[str, Any]) -> None:
    """The old layout: base loaded in its stored dtype, adapted, everything saved."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS, ModelLoadError
    from napari_tghmoe.model.modeling import adapt_2d_mllm

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(base), **OFFLINE_LOAD_KWARGS, use_safetensors=True, dtype="auto", device_map={"": "cpu"}
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(base, f"weights cannot be loaded ({type(err).__name__}: {err})") from None
    model = adapt_2d_mllm(model, settings)
    model.save_pretrained(staging)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="turn a Qwen2.5-VL model folder into a TGH-MoE checkpoint",
        description=(
            "Adapt a local Qwen2.5-VL (safetensors) folder to 3D CT with text-guided hierarchical "
            "experts; base weights are kept bit-identical, experts start untrained. The output holds "
            "only the new tensors and refers to the base folder (keep it), unless --standalone."
        ),
    )
    parser.add_argument("--base", required=True, metavar="QWEN2_5_VL_FOLDER", help="plain Qwen2.5-VL folder")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="where to write the TGH-MoE checkpoint")
    parser.add_argument("--moe-blocks", type=_int_list, metavar="I,J,..", help="vision blocks that get experts")
    parser.add_argument("--groups", metavar="A,B,..", help='expert groups, "shared" first')
    parser.add_argument("--experts", type=int, metavar="N", help="experts per group")
    parser.add_argument("--top-k", type=int, metavar="K", help="experts chosen per visual token in a group")
    parser.add_argument("--lora-rank", type=int, metavar="R", help="rank of each LoRA expert")
    parser.add_argument("--llm-lora-rank", type=int, metavar="R", help="rank of the LLM LoRA (0: none)")
    parser.add_argument("--volume-grid", type=_int_list, metavar="D,H,W", help="model grid the CT is resampled to")
    parser.add_argument(
        "--depth-mm-per-position", type=float, metavar="MM", help="temporal rope position per MM of depth"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--standalone", action="store_true",
        help="copy the base weights into the output too (default: the output refers to the base folder)",
    )
    parser.set_defaults(func=run_convert)
    register_attach_encoder(subparsers)


def register_attach_encoder(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "attach-encoder",
        help="give a TGH-MoE folder a pre-trained 3D encoder (Med3DInsight) whose tokens go to the LLM",
        description=(
            "Copy a TGH-MoE folder and attach a Med3DInsight segmentation model as a frozen 3D encoder: its "
            "pooled tokens, projected by a new text-guided projector (zero output until trained), go to the "
            "LLM beside the video tokens. Base weights and experts are unchanged; train the projector with "
            "tghmoe train ([model] volume_encoder)."
        ),
    )
    parser.add_argument("--model", required=True, metavar="TGHMOE_FOLDER", help="TGH-MoE model folder")
    parser.add_argument("--encoder", required=True, metavar="SEG_FOLDER", help="Med3DInsight segmentation model folder")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="where to write the model with its encoder")
    parser.add_argument("--tokens-grid", type=_int_list, metavar="Z,Y,X", help="token grid (default 2,4,4)")
    parser.add_argument("--experts", type=int, metavar="N", help="projector experts (default 4)")
    parser.add_argument("--hidden", type=int, metavar="H", help="projector expert hidden size (default: LLM hidden)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=run_attach_encoder)


def run_attach_encoder(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.model.loading import ModelLoadError
    from napari_tghmoe.model.volume_tokens import VolumeEncoderError, attach_encoder_to_folder

    if args.tokens_grid is not None and len(args.tokens_grid) != 3:
        raise CLIError(f"--tokens-grid needs three sizes Z,Y,X, got {args.tokens_grid}")
    try:
        out = attach_encoder_to_folder(
            args.model, args.encoder, args.out, tokens_grid=args.tokens_grid, experts=args.experts,
            hidden=args.hidden, overwrite=args.overwrite,
        )
    except (ModelLoadError, VolumeEncoderError, FileExistsError, ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    print(f"TGH-MoE model with the 3D encoder {Path(args.encoder)} written to {out}")
    return 0


def moe_settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TGH-MoE settings the user gave (the rest keep TGHMoEConfig's defaults)."""
    settings: dict[str, Any] = {}
    if args.moe_blocks:
        settings["moe_blocks"] = args.moe_blocks
    if args.groups:
        settings["group_names"] = [g.strip() for g in args.groups.split(",") if g.strip()]
    if args.experts is not None:
        settings["experts_per_group"] = args.experts
    if args.top_k is not None:
        settings["router_top_k"] = args.top_k
    if args.lora_rank is not None:
        settings["lora_rank"] = args.lora_rank
    if args.llm_lora_rank is not None:
        settings["llm_lora_rank"] = args.llm_lora_rank
    if args.volume_grid:
        settings["volume_grid"] = args.volume_grid
    if args.depth_mm_per_position is not None:
        settings["depth_mm_per_position"] = args.depth_mm_per_position
    return settings


def run_convert(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.model.loading import ModelLoadError

    try:
        out = convert_checkpoint(
            args.base, args.out, moe_settings_from_args(args), overwrite=args.overwrite,
            standalone=getattr(args, "standalone", False),
        )
    except (ModelLoadError, FileExistsError, ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    if getattr(args, "standalone", False):
        print(f"TGH-MoE checkpoint written to {out}")
    else:
        print(f"TGH-MoE checkpoint written to {out} (experts only; base weights read from {Path(args.base)})")
    return 0
