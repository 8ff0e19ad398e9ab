"""``tghmoe convert``: a plain Qwen2.5-VL folder -> a TGH-MoE checkpoint folder.

The base weights are loaded in their stored dtype, adapted in place by ``adapt_2d_mllm``
(experts, routers and LLM LoRA added beside them, no base tensor changed) and saved as
safetensors with the TGH-MoE config; tokenizer, chat template and processor files are
copied so the new folder loads on its own with ``load_model``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
)


def convert_checkpoint(
    base: str | Path, out: str | Path, moe_config: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write a TGH-MoE checkpoint for the Qwen2.5-VL folder ``base`` into ``out``; return ``out``.

    Raises ``ModelLoadError`` for a bad base folder and ``FileExistsError`` when ``out`` holds
    files and ``overwrite`` is False. The folder appears complete or not at all (staged, then
    renamed).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS, ModelLoadError, check_model_folder
    from napari_tghmoe.model.modeling import adapt_2d_mllm

    check = check_model_folder(base)
    if check.is_tghmoe:
        raise ModelLoadError(check.path, "already a TGH-MoE checkpoint: nothing to convert")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty (use --overwrite)")
    if out.resolve() == check.path.resolve():
        raise FileExistsError(f"{out}: the output folder must differ from the base folder")

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(check.path), **OFFLINE_LOAD_KWARGS, use_safetensors=True, dtype="auto", device_map={"": "cpu"}
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(check.path, f"weights cannot be loaded ({type(err).__name__}: {err})") from None
    model = adapt_2d_mllm(model, moe_config)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        for name in COPIED_FILES:
            source = check.path / name
            if source.is_file() and not (staging / name).exists():
                shutil.copy2(source, staging / name)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


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
            "experts; base weights are kept bit-identical, experts start untrained."
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
    parser.set_defaults(func=run_convert)


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
        out = convert_checkpoint(args.base, args.out, moe_settings_from_args(args), overwrite=args.overwrite)
    except (ModelLoadError, FileExistsError, ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    print(f"TGH-MoE checkpoint written to {out}")
    return 0
