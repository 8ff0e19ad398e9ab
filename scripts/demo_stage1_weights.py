"""Write the bundled demo model's stage-1 function as a model folder, to rerun stage 2 from it.

Stage 2 trains only the task experts and the routers of the task groups (``set_stage``), and the
task experts add nothing until stage 2 starts (B = 0), so the stage-1 model is the shipped model
with every stage-2 part set back: task experts at B = 0 (A re-drawn), level-1 task routers and the
task groups' token/text routers re-drawn, the ``task_experts_initialised`` flags cleared. Stage 1
itself (111 CPU minutes) need not be rerun to measure a change of stage 2 or of the evaluation.

    python scripts/demo_stage1_weights.py --out runs/demo-s1 [--model resources/demo-model]
    tghmoe train --config recipes/demo.toml --stage 2 --init runs/demo-s1 --out runs/demo-s2
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS
from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration
from napari_tghmoe.model.prompts import SHARED_GROUP

DEMO = Path(__file__).resolve().parent.parent / "resources" / "demo-model"


@torch.no_grad()
def reset_stage2_parts(model: TGHMoEForConditionalGeneration, seed: int = 0) -> int:
    """Every stage-2 tensor back to its initial distribution; returns the tensors reset."""
    generator = torch.Generator().manual_seed(seed)

    def uniform_(param: torch.Tensor, fan_in: int) -> None:
        bound = 1.0 / math.sqrt(fan_in)
        param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)

    reset = 0
    for layer in model.moe_layers().values():
        for name in layer.task_group_names:
            group = layer.groups[name]
            uniform_(group.lora_A, group.lora_A.shape[-1])
            group.lora_B.zero_()
            uniform_(group.router.weight, group.router.weight.shape[-1])
            uniform_(group.text_router.weight, group.text_router.weight.shape[-1])
            reset += 4
        if layer.task_router is not None:
            uniform_(layer.task_router.weight, layer.task_router.weight.shape[-1])
            layer.task_router.bias.zero_()
            reset += 2
        layer.task_experts_initialised.fill_(False)
    assert all(SHARED_GROUP in layer.groups for layer in model.moe_layers().values())
    return reset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO), help="a TGH-MoE folder trained in two stages")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source, out = Path(args.model), Path(args.out)
    if out.exists():
        parser.error(f"{out}: exists; give a new folder")
    model = TGHMoEForConditionalGeneration.from_pretrained(str(source), **OFFLINE_LOAD_KWARGS)
    count = reset_stage2_parts(model, args.seed)
    model.save_pretrained(str(out))
    for item in source.iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and item.suffix != ".safetensors" and not (out / item.name).exists():
            if item.name in ("README.md", "eval_results.json", "card_check.json"):
                continue
            shutil.copy2(item, out / item.name)
    print(f"{out}: stage-1 weights of {source} ({count} stage-2 tensors reset)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
