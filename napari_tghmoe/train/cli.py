"""``tghmoe train``: one stage (or both) of a TOML recipe, resumable, on ``accelerate``.

    tghmoe train --config recipes/demo.toml --stage 1 --out runs/demo/stage1
    tghmoe train --config recipes/demo.toml --stage 2 --init runs/demo/stage1 --out runs/demo/stage2
    tghmoe train --config recipes/demo.toml --stage both --out runs/demo   # stage1/ (+ phases) then stage2/
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml -m napari_tghmoe train ...
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="train TGH-MoE (stage 1, stage 2 or both) from a TOML recipe")
    parser.add_argument("--config", required=True, metavar="TOML", help="recipe file, e.g. recipes/demo.toml")
    parser.add_argument("--stage", default="1", choices=["1", "2", "both"], help="1, 2, or both (OUT/stage1 then OUT/stage2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (model, log, checkpoints)")
    parser.add_argument("--init", metavar="DIR", help="start from this TGH-MoE folder (stage 2: the stage-1 output)")
    parser.add_argument(
        "--init-weights",
        metavar="DIR",
        help="build the model from the recipe, then copy the matching tensors of this TGH-MoE folder (ablations)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. stage1.steps=200 or model.moe.text_guidance=false (TOML values)",
    )
    parser.add_argument(
        "--phase",
        type=int,
        metavar="N",
        help="with --stage 1 or 2: only the recipe's stage-1 phase N (1 = its own stage 1, 2 = the first "
        "[[stage1_continue]]...) from --init, or stage 2 on phase N's data (a new last phase without rerunning the others)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=VALUE`` -> values["a"]["b"]["c"] = VALUE (VALUE parsed as TOML, else a string)."""
    from napari_tghmoe.cli import CLIError

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE")
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CLIError(f"--set {item!r}: {part} is not a table")
        node[parts[-1]] = _toml_value(raw.strip())
    return values


def load_recipe_with_overrides(path: str, overrides: list[str]):
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.train.recipe import RecipeError, read_recipe_values, recipe_from_dict

    try:
        return recipe_from_dict(apply_overrides(read_recipe_values(path), overrides), str(path))
    except RecipeError as err:
        raise CLIError(str(err)) from err


def stage1_phase_dir(out: Path, index: int) -> Path:
    """``OUT/stage1`` for the recipe's own stage 1, ``OUT/stage1-2``, ``OUT/stage1-3``... for its continuations."""
    return out / ("stage1" if index == 1 else f"stage1-{index}")


def recipe_phase(recipe: Any, phase: int, stage: int) -> Any:
    """The recipe as ``--phase`` runs it: stage 1 with phase ``phase``'s settings, or stage 2 on its data
    (as :func:`train_both_stages` runs stage 2 on the last phase's data)."""
    import dataclasses

    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.train.recipe import stage1_phases

    phases = stage1_phases(recipe)
    if not 1 <= phase <= len(phases):
        raise CLIError(f"{recipe.path}: --phase {phase}, but the recipe has stage-1 phases 1-{len(phases)}")
    chosen = phases[phase - 1]
    return chosen if stage == 1 else dataclasses.replace(recipe, data=chosen.data)


def train_both_stages(recipe: Any, out: Path, *, init: str | None, resume: bool, progress: bool) -> list[Any]:
    """Stage 1 and its ``stage1_continue`` phases (each from the previous output), then stage 2
    on the last phase's data (the task experts specialise on what stage 1 ended on: the demo
    recipe's later phases read full-size phantoms and their evidence, its first ones small grids).

    With ``resume``, finished phases (their folder holds the saved model) are kept and the
    interrupted one continues from its last checkpoint.
    """
    import dataclasses

    from napari_tghmoe.train.recipe import phase_changes_model, stage1_phases
    from napari_tghmoe.train.trainer import SUMMARY_NAME, TrainResult, load_training_samples, train

    results = []
    loaded: dict[str, Any] = {}
    previous = init
    phases = stage1_phases(recipe)
    for index, phase in enumerate(phases, start=1):
        folder = stage1_phase_dir(out, index)
        if resume and (folder / SUMMARY_NAME).is_file() and (folder / "model.safetensors").is_file():
            results.append(TrainResult(folder, 1, phase.stage1.steps, phase.stage1.steps, 0.0, {}, finished=True))
        else:
            key = repr((phase.data.train, phase.data.tasks, phase.data.phrasing, phase.seed))
            if key not in loaded:
                loaded = {key: load_training_samples(phase)}  # one set in memory at a time
            # A phase that changes the model is built from its recipe and takes the previous
            # phase's matching tensors; the others load the previous phase's folder whole.
            rebuild = phase_changes_model(recipe, index)
            results.append(
                train(
                    phase, 1, folder, init=None if rebuild else previous, init_weights=previous if rebuild else None,
                    resume=resume, progress=progress, samples=loaded[key],
                )
            )
        previous = str(folder)
    stage2 = dataclasses.replace(recipe, data=phases[-1].data)
    results.append(train(stage2, 2, out / "stage2", init=previous, resume=resume, progress=progress))
    return results


def run_train(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.train.recipe import RecipeError
    from napari_tghmoe.train.trainer import load_training_samples, train

    recipe = load_recipe_with_overrides(args.config, args.set)
    out = Path(args.out)
    if args.init and not Path(args.init).is_dir():
        raise CLIError(f"{args.init}: --init folder not found")
    try:
        if args.stage == "both" and args.phase is not None:
            raise CLIError("--phase runs one phase: give --stage 1 or --stage 2")
        if args.stage == "both":
            results = train_both_stages(recipe, out, init=args.init, resume=args.resume, progress=not args.no_progress)
        else:
            stage = int(args.stage)
            if args.phase is not None:
                recipe = recipe_phase(recipe, args.phase, stage)
            if stage == 2 and not (args.init or args.init_weights):
                # --init-weights: a stage-1 output whose matching tensors go into a model built
                # from the recipe (an ablation that changes the routing of stage 2)
                raise CLIError("stage 2 starts from the stage-1 output: pass --init DIR (or --init-weights DIR)")
            results = [
                train(
                    recipe, stage, out, init=args.init, resume=args.resume, progress=not args.no_progress,
                    init_weights=args.init_weights,
                )
            ]
    except RecipeError as err:
        raise CLIError(str(err)) from err
    for result in results:
        loss = result.last_log.get("total")
        loss_text = f", last loss {loss:.4f}" if isinstance(loss, float) else ""
        print(
            f"stage {result.stage}: {result.steps_done}/{result.total_steps} steps in {result.seconds:.1f} s"
            f"{loss_text} -> {result.out_dir}",
            file=sys.stderr,
        )
    return 0
