"""The ``tghmoe`` command: ask, report, train, eval, convert, bench.

Each sub-command lives beside the code it drives and registers itself here through a
``register(subparsers)`` function; heavy imports happen only inside the command that runs.
Errors a user can fix (bad file, bad model folder) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module path -> it defines register(subparsers) adding one or more sub-commands
_COMMAND_MODULES = [
    "napari_tghmoe.cli_infer",  # ask, report
    "napari_tghmoe.model.convert",  # convert
    "napari_tghmoe.train.cli",  # train
    "napari_tghmoe.eval.cli",  # eval, eval-baseline
    "napari_tghmoe.cli_bench",  # bench
    "napari_tghmoe.med3d.cli",  # pretrain, finetune-seg, segment, eval-seg
]


class CLIError(Exception):
    """An error to show the user as one line (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tghmoe",
        description="Ask a local 3D medical multimodal model (TGH-MoE) about CT scans.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # command not built yet in this checkout
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from napari_tghmoe.io import VolumeReadError

    try:
        return int(args.func(args) or 0)
    except (CLIError, VolumeReadError, FileNotFoundError) as err:
        print(f"tghmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tghmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
