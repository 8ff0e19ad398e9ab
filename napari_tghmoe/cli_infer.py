"""``tghmoe ask`` and ``tghmoe report``: the chat dock's engine, headless, on the command line.

``ask`` streams one answer to stdout. ``report`` writes a ``.txt`` and a ``.json`` report per
scan for a whole archive, with a progress bar; a bad scan is reported and skipped, the run
goes on, and the exit status says whether any failed. ``--shard i/n`` splits the sorted list
of scans so n machines (or GPUs) can share an archive without talking to each other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REPORT_REQUEST = "Generate a radiology report."

# Single-file volume formats (everything else in a folder is taken for DICOM slices).
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def register(subparsers: Any) -> None:
    ask = subparsers.add_parser("ask", help="ask one question about one CT scan; the answer streams to stdout")
    ask.add_argument("volume", help="DICOM folder or file, NIfTI, MetaImage or NRRD")
    ask.add_argument("question", help='e.g. "Is there a liver lesion?" or "Generate a report"')
    ask.add_argument("--json", metavar="OUT", help="also write the full answer record (report JSON) here")
    ask.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_model_options(ask)
    ask.set_defaults(func=run_ask)

    report = subparsers.add_parser("report", help="write a report (.txt + .json) for each of many scans")
    report.add_argument("inputs", nargs="+", metavar="INPUT", help="scans, or folders holding scans")
    report.add_argument("--out", required=True, metavar="DIR", help="output folder")
    report.add_argument("--shard", metavar="I/N", help="process only the I-th of N parts (1-based), e.g. 2/4")
    report.add_argument("--question", default=DEFAULT_REPORT_REQUEST, help="the request sent for every scan")
    report.add_argument("--overwrite", action="store_true", help="replace existing reports")
    _add_model_options(report)
    report.set_defaults(func=run_report)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="TGH-MoE model folder (default: the bundled demo model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quantization", default="auto", choices=["auto", "4bit", "8bit", "none"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="precision of the unquantized weights (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument(
        "--allow-non-ct", action="store_true",
        help="answer about an MR/PET/... series anyway (the model reads CT in HU; the answer is meaningless)",
    )


# ---------------------------------------------------------------------------- helpers


def resolve_model_path(model: str | None) -> Path:
    """``--model`` or the bundled demo model; a one-line error when neither exists."""
    from napari_tghmoe.cli import CLIError

    if model:
        path = Path(model)
        if not path.is_dir():
            raise CLIError(f"{path}: model folder not found")
        return path
    from napari_tghmoe._resources import demo_model_path

    try:
        demo = demo_model_path()
    except FileNotFoundError:
        demo = None
    if demo is None or not demo.is_dir():
        raise CLIError("no model given and the bundled demo model is not installed: pass --model DIR")
    return demo


def load_engine(args: argparse.Namespace) -> Any:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.engine import InferenceEngine

    path = resolve_model_path(args.model)
    dtype = getattr(args, "dtype", "auto")
    try:
        return InferenceEngine.from_pretrained(
            path, device=args.device, quantization=args.quantization, dtype=None if dtype == "auto" else dtype
        )
    except Exception as err:  # ModelLoadError and friends: one line, not a traceback
        message = _one_line(err)
        if "not enough memory" in message:
            message += " (pick one with --dtype bfloat16 or --quantization 8bit / 4bit)"
        raise CLIError(f"{path}: cannot load model: {message}") from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def stream_answer(engine: Any, volume: Any, question: str, max_new_tokens: int, out: Any = None) -> Any:
    """Run one answer, writing text chunks to ``out`` as they come; return the ``Answer``."""
    answer = None
    for item in engine.answer(volume, question, max_new_tokens=max_new_tokens):
        if isinstance(item, str):
            if out is not None:
                out.write(item)
                out.flush()
        else:
            answer = item
    if answer is None:
        raise RuntimeError("the engine finished without an answer")
    return answer


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> (1, 4): zero-based index and count; ``None`` -> the whole list."""
    from napari_tghmoe.cli import CLIError

    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise CLIError(f"--shard {text!r}: expected I/N, e.g. 2/4") from None
    if count < 1 or not 1 <= index <= count:
        raise CLIError(f"--shard {text!r}: I must be between 1 and N")
    return index - 1, count


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(_VOLUME_SUFFIXES)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Scans named by the inputs: a volume file, a DICOM folder, or folders of those.

    A folder that holds loose files (other than single-file volumes) is one DICOM scan;
    otherwise each volume file and each subfolder in it is expanded in turn.
    """
    scans: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.is_dir():
            scans.append(path)  # a missing file is reported as a failure of its own
            continue
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        loose = [p for p in children if p.is_file() and not _is_volume_file(p)]
        if loose:
            scans.append(path)
            continue
        for child in children:
            if child.is_dir():
                scans.extend(expand_inputs([child]))
            elif _is_volume_file(child) and not child.name.lower().endswith(".raw"):
                scans.append(child)
    seen: set[Path] = set()
    unique = []
    for scan in scans:
        key = scan.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(scan)
    return unique


def _stem_for(scan: Path, used: set[str]) -> str:
    from napari_tghmoe.report import safe_stem

    name = scan.name
    for suffix in sorted(_VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = safe_stem(name, fallback="scan")
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def read_scan(path: str | Path, *, allow_non_ct: bool = False, say: Any = None) -> Any:
    """Load a scan, telling every reader warning as a ``warning: PATH: ...`` line on stderr.

    A series that is not CT is refused (:class:`CLIError`, one line naming the modality) unless
    ``allow_non_ct``: the model would read its values as Hounsfield units.
    """
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.io import load_volume
    from napari_tghmoe.io._checks import modality_problem

    say = say or (lambda line: print(line, file=sys.stderr))
    volume = load_volume(path)  # VolumeReadError -> one line naming the file
    problem = modality_problem(volume)
    if problem and not allow_non_ct:
        raise CLIError(f"{path}: {problem} (pass --allow-non-ct to answer anyway)")
    for warning in volume.warnings:
        say(f"warning: {path}: {' '.join(str(warning).split())}")
    return volume


@dataclass
class ScanFailure:
    scan: Path
    reason: str

    def __str__(self) -> str:
        # VolumeReadError messages already start with the path
        return self.reason if self.reason.startswith(str(self.scan)) else f"{self.scan}: {self.reason}"


# ---------------------------------------------------------------------------- commands


def run_ask(args: argparse.Namespace) -> int:
    from napari_tghmoe.report import ReportDocument, export_report

    volume = read_scan(args.volume, allow_non_ct=args.allow_non_ct)  # bad scan -> one line, exit 2 (cli.main)
    engine = load_engine(args)
    answer = stream_answer(engine, volume, args.question, args.max_new_tokens, out=sys.stdout)
    sys.stdout.write("\n")
    rate = (getattr(answer, "timings", None) or {}).get("tokens_per_s")
    details = [getattr(answer, "device", ""), getattr(answer, "precision", "")]
    if rate:
        details.append(f"{rate:.1f} tokens/s")
    print(f"[{', '.join(d for d in details if d)}]", file=sys.stderr)
    if args.json:
        document = ReportDocument.from_answer(answer, volume, question=args.question)
        export_report(document, args.json, format="json", overwrite=args.overwrite)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.report import ReportDocument, ReportExistsError, export_all

    scans = expand_inputs(args.inputs)
    if not scans:
        raise CLIError("no scans found in the inputs")
    index, count = parse_shard(args.shard)
    used: set[str] = set()
    stems = {scan: _stem_for(scan, used) for scan in scans}  # names stable across shards
    mine = scans[index::count]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = load_engine(args)

    failures: list[ScanFailure] = []
    written = 0
    with tqdm(mine, desc="reports", unit="scan", file=sys.stderr, dynamic_ncols=True) as bar:
        for scan in bar:
            bar.set_postfix_str(scan.name[:30])
            try:
                volume = read_scan(scan, allow_non_ct=args.allow_non_ct, say=lambda line: tqdm.write(line, file=sys.stderr))
                answer = stream_answer(engine, volume, args.question, args.max_new_tokens)
                document = ReportDocument.from_answer(answer, volume, question=args.question)
                export_all(document, out, stems[scan], formats=["txt", "json"], overwrite=args.overwrite)
                written += 1
            except KeyboardInterrupt:
                raise
            except ReportExistsError as err:
                failures.append(ScanFailure(scan, f"{err.path} exists (pass --overwrite to replace it)"))
                tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
            except CLIError as err:  # e.g. not CT: the message already names the scan
                failures.append(ScanFailure(scan, _one_line(err)))
                tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
            except Exception as err:  # carry on past a bad scan; list it at the end
                if getattr(args, "debug", False):
                    raise
                failures.append(ScanFailure(scan, _one_line(err)))
                tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
    print(f"{written} report(s) written to {out}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} scan(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0
