"""The ``tghmoe`` command: ask, report, train, eval, convert, bench.

Each sub-command lives beside the code it drives and registers itself here through a
``register(subparsers)`` function; heavy imports happen only inside the command that runs.
Errors a user can fix (bad file, bad model folder) print one line and exit 2; anything else
prints one line and exits 1. ``--debug`` (before or after the command) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Any

# module path -> it defines register(subparsers) adding one or more sub-commands
_COMMAND_MODULES = [
    "napari_tghmoe.cli_infer",  # ask, report
    "napari_tghmoe.model.convert",  # convert
    "napari_tghmoe.train.cli",  # train
    "napari_tghmoe.train.detection",  # probe-detection
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
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and warnings (for bug reports)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # command not built yet in this checkout
                continue
            raise
        module.register(subparsers)
    for command_parser in subparsers.choices.values():  # `tghmoe ask ... --debug` works too
        if "--debug" not in command_parser._option_string_actions:
            command_parser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
            )
    return parser


def _one_line_warnings(command: str) -> None:
    """Python warnings (e.g. the engine's intensity warning) as one ``warning:`` line each."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = " ".join(str(message).split())
        print(f"tghmoe {command}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show  # type: ignore[assignment]


def _error_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from napari_tghmoe.io import VolumeReadError

    debug = bool(getattr(args, "debug", False))
    shown_before = warnings.showwarning
    if not debug:
        _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except (CLIError, VolumeReadError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"tghmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tghmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an unforeseen input: one line, the traceback with --debug
        if debug:
            raise
        print(
            f"tghmoe {args.command}: error: {_error_line(err)} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.showwarning = shown_before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
