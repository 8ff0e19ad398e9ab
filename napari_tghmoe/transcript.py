"""Chat transcript: turns with timestamps, autosaved to an append-only JSONL file (no Qt).

Every change is appended as one JSON line and flushed to disk at once, so a crash of the
viewer loses at most the line being written. A turn that changes later (an answer that
streams in) is appended again with the same ``id``; reading keeps the last record of each id.
A damaged last line (a crash mid-write) is skipped on load.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("user", "assistant", "error", "info")


def user_data_dir() -> Path:
    """Per-user data folder of the plugin (transcripts, settings, placeholder model cache)."""
    from platformdirs import user_data_dir as _user_data_dir

    override = os.environ.get("TGHMOE_USER_DIR")
    return Path(override) if override else Path(_user_data_dir("napari-tghmoe", appauthor=False))


def default_transcript_path() -> Path:
    return user_data_dir() / "transcript.jsonl"


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Turn:
    """One line of the conversation; ``meta`` holds e.g. the report dict of an answer."""

    id: int
    role: str
    text: str
    timestamp: str = field(default_factory=_now)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def time_label(self) -> str:
        """HH:MM:SS for display."""
        try:
            return _dt.datetime.fromisoformat(self.timestamp).strftime("%H:%M:%S")
        except ValueError:
            return self.timestamp


class Transcript:
    """The turns of one conversation, mirrored to ``path`` (``None``: memory only)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.turns: list[Turn] = []
        self._next_id = 1
        if self.path is not None and self.path.exists():
            self.turns = list(_read_jsonl(self.path))
            self._next_id = max((t.id for t in self.turns), default=0) + 1
            self._rewrite()  # compact: one line per turn

    def __len__(self) -> int:
        return len(self.turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self.turns)

    def add(self, role: str, text: str, **meta: Any) -> Turn:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {ROLES})")
        turn = Turn(id=self._next_id, role=role, text=text, meta=dict(meta))
        self._next_id += 1
        self.turns.append(turn)
        self._append(turn)
        return turn

    def update(self, turn: Turn, text: str | None = None, **meta: Any) -> Turn:
        """Change a turn (streamed text, the final answer's report) and autosave it."""
        if text is not None:
            turn.text = text
        turn.meta.update(meta)
        self._append(turn)
        return turn

    def get(self, turn_id: int) -> Turn | None:
        return next((t for t in self.turns if t.id == turn_id), None)

    def answers(self) -> list[Turn]:
        """Assistant turns that finished with a recorded answer (newest last)."""
        return [t for t in self.turns if t.role == "assistant" and t.meta.get("report")]

    def clear(self) -> None:
        self.turns = []
        self._rewrite()

    def to_text(self) -> str:
        """"[HH:MM:SS] role: text" per turn; indented below it, what an answer followed (context
        turns, a region) and where its stated findings lie."""
        lines = []
        for turn in self.turns:
            lines.append(f"[{turn.time_label}] {turn.role}: {turn.text}")
            lines += [f"    {line}" for line in _detail_lines(turn.meta)]
        return "".join(line + "\n" for line in lines)

    # ------------------------------------------------------------------ storage
    def _append(self, turn: Turn) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(turn), ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _rewrite(self) -> None:
        """Atomically replace the file with one line per current turn."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                for turn in self.turns:
                    handle.write(json.dumps(asdict(turn), ensure_ascii=False, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _detail_lines(meta: dict[str, Any]) -> list[str]:
    lines = []
    context = meta.get("context_turns") or []
    if context:
        lines.append(f"context: {len(context)} earlier turn{'s' if len(context) != 1 else ''}")
    region = meta.get("region")
    if isinstance(region, dict) and region.get("voxel_start_zyx"):
        start, stop = region["voxel_start_zyx"], region.get("voxel_stop_zyx") or region["voxel_start_zyx"]
        spans = ", ".join(
            f"{n} {a}" if b - a <= 1 else f"{n} {a}-{b - 1}" for n, a, b in zip("zyx", start, stop)
        )
        on = f" on {region['plane']}" if region.get("plane") else ""
        lines.append(f"region: {region.get('kind', 'box')}{on}, voxels {spans}")
    for found in meta.get("located_findings") or []:
        try:
            voxel = ", ".join(str(int(v)) for v in found["voxel_zyx"])
            mm = ", ".join(f"{float(v):.1f}" for v in found["position_mm"])
        except (KeyError, TypeError, ValueError):
            continue
        where = f" ({found['location']})" if found.get("location") else ""
        line = f"finding: {found.get('kind', '')}{where} at voxel (z, y, x) {voxel}, (x, y, z) {mm} mm"
        if line not in lines:  # a finding named twice (findings and impression) is one place
            lines.append(line)
    return lines


def _read_jsonl(path: Path) -> Iterator[Turn]:
    """Turns in first-seen order, each with its last recorded state; bad lines skipped."""
    latest: dict[int, Turn] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                turn = Turn(
                    id=int(record["id"]),
                    role=str(record["role"]),
                    text=str(record.get("text", "")),
                    timestamp=str(record.get("timestamp", "")),
                    meta=dict(record.get("meta") or {}),
                )
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            latest[turn.id] = turn
    yield from latest.values()


def load_transcript(path: str | Path) -> Transcript:
    return Transcript(path)
