"""Where a finding lies, in a report's words: the site head of the scan evidence (issue 15).

The organ model names the structure a finding touches ("left kidney", "aorta"); a report names a
site ("left kidney, lower pole", "subcarinal region", "left pleural space"). The site head is a
small classifier from a finding's evidence (kind, organ, position in the body, in its organ's box
and relative to the aorta; :mod:`napari_tghmoe.med3d.evidence`) to the site names a kind was seen
at in training. It is trained on the cascade's own findings matched to phantom truth
(:func:`training_pairs`), so it learns the cascade's habits too (a para-aortic node the organ
model calls "left kidney"). It lives beside the cascade in a chat model's evidence folder
(``sites.safetensors`` + ``sites.json``), with the phase head (``phase.*``), the same small
classifier reading the organs' attenuation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Site slots of a finding token (the head's names, zero-padded).
MAX_SITES = 32


def site_input(finding: Any) -> np.ndarray:
    """The head's input: a finding token's geometry and identity (no certainty: a site is a site)."""
    from napari_tghmoe.med3d.evidence import finding_geometry_vector

    return finding_geometry_vector(finding)


def _head_probabilities(weights: dict[str, np.ndarray], x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A one-hidden-layer MLP's softmax over the allowed outputs (zeros when none is allowed)."""
    if not allowed.any():
        return np.zeros(allowed.size, dtype=np.float32)
    hidden = np.maximum(x @ weights["w1"] + weights["b1"], 0.0)
    logits = np.where(allowed, hidden @ weights["w2"] + weights["b2"], -np.inf)
    exp = np.exp(logits - logits[allowed].max())
    return (exp / exp.sum()).astype(np.float32)


def _fit_head(
    x: np.ndarray, y: np.ndarray, allowed: np.ndarray, hidden: int, steps: int, seed: int
) -> tuple[dict[str, np.ndarray], float]:
    """Full-batch AdamW fit of that MLP; (weights, training accuracy)."""
    import torch

    inputs, targets = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    mask = torch.tensor(allowed)
    generator = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(inputs.shape[1], hidden, generator=generator) / np.sqrt(inputs.shape[1])).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, mask.shape[1], generator=generator) / np.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(mask.shape[1], requires_grad=True)
    optimiser = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        logits = torch.relu(inputs @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.cross_entropy(logits.masked_fill(~mask, -1e9), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        logits = (torch.relu(inputs @ w1 + b1) @ w2 + b2).masked_fill(~mask, -1e9)
        accuracy = float((logits.argmax(1) == targets).float().mean())
    weights = {name: t.detach().numpy().copy() for name, t in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2))}
    return weights, accuracy


def _save_head(folder: str | Path, prefix: str, weights: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, str(folder / f"{prefix}.safetensors"))
    (folder / f"{prefix}.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def _load_head(folder: str | Path, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / f"{prefix}.json").is_file():
        return None
    return load_file(str(folder / f"{prefix}.safetensors")), json.loads((folder / f"{prefix}.json").read_text(encoding="utf-8"))


@dataclass
class SiteHead:
    """A softmax classifier over ``names``, restricted to the names each kind was seen at."""

    names: list[str]
    kinds: dict[str, list[str]]  # kind -> allowed names
    weights: dict[str, np.ndarray]  # w1 (F, H), b1 (H), w2 (H, S), b2 (S)

    def probabilities(self, finding: Any) -> np.ndarray:
        """(len(names),) probabilities of the finding's site (zeros for a kind never seen)."""
        allowed = np.asarray([name in self.kinds.get(finding.kind, ()) for name in self.names])
        return _head_probabilities(self.weights, site_input(finding), allowed)

    def site(self, finding: Any) -> tuple[str | None, float]:
        probs = self.probabilities(finding)
        if not probs.any():
            return None, 0.0
        best = int(np.argmax(probs))
        return self.names[best], float(probs[best])

    def save(self, folder: str | Path) -> None:
        _save_head(folder, "sites", self.weights, {"names": self.names, "kinds": self.kinds})

    @classmethod
    def load(cls, folder: str | Path) -> SiteHead | None:
        """The head saved in ``folder``, or None when there is none."""
        found = _load_head(folder, "sites")
        if found is None:
            return None
        weights, config = found
        return cls(names=list(config["names"]), kinds={k: list(v) for k, v in config["kinds"].items()}, weights=weights)


@dataclass
class PhaseHead:
    """The contrast phase from the organs' attenuation (the scan token's features)."""

    names: list[str]
    weights: dict[str, np.ndarray]

    def probabilities(self, evidence: Any) -> np.ndarray:
        from napari_tghmoe.med3d.evidence import scan_vector

        return _head_probabilities(self.weights, scan_vector(evidence), np.ones(len(self.names), dtype=bool))

    def phase(self, evidence: Any) -> tuple[str, float]:
        probabilities = self.probabilities(evidence)
        best = int(np.argmax(probabilities))
        return self.names[best], float(probabilities[best])

    def save(self, folder: str | Path) -> None:
        _save_head(folder, "phase", self.weights, {"names": self.names})

    @classmethod
    def load(cls, folder: str | Path) -> PhaseHead | None:
        found = _load_head(folder, "phase")
        return None if found is None else cls(names=list(found[1]["names"]), weights=found[0])


def train_phase_head(records: Sequence[dict[str, Any]], steps: int = 1500, seed: int = 0) -> tuple[PhaseHead, float]:
    """A phase head fitted on scan evidence records with ``truth.phase``."""
    from napari_tghmoe.med3d.evidence import ScanEvidence, scan_vector

    if not records:
        raise ValueError("no scans to train a phase head on")
    names = sorted({str(r["truth"]["phase"]) for r in records})
    x = np.stack([scan_vector(ScanEvidence.from_json(r)) for r in records])
    y = np.asarray([names.index(str(r["truth"]["phase"])) for r in records])
    weights, accuracy = _fit_head(x, y, np.ones((len(records), len(names)), dtype=bool), 32, steps, seed)
    return PhaseHead(names=names, weights=weights), accuracy


def training_pairs(records: Iterable[dict[str, Any]], max_distance_mm: float = 30.0) -> list[tuple[Any, str]]:
    """(found finding, true site) pairs: each true finding matched to the nearest found finding of
    its kind within ``max_distance_mm`` (``records``: ``scripts/scan_evidence.py`` JSON, with
    ``truth`` findings carrying ``center_voxel`` on the scan grid and the scan's ``spacing``)."""
    from napari_tghmoe.med3d.evidence import ScanEvidence

    pairs = []
    for record in records:
        evidence = ScanEvidence.from_json(record)
        spacing = np.asarray(record["truth"].get("spacing") or (2.0, 2.0, 2.0), dtype=float)
        used: set[int] = set()
        for truth in record["truth"]["findings"]:
            best, best_distance = None, max_distance_mm
            for index, found in enumerate(evidence.findings):
                if index in used or found.kind != truth["kind"]:
                    continue
                distance = float(np.linalg.norm((np.asarray(found.voxel_zyx) - np.asarray(truth["center_voxel"])) * spacing))
                if distance <= best_distance:
                    best, best_distance = index, distance
            if best is not None:
                used.add(best)
                pairs.append((evidence.findings[best], str(truth["location"])))
    return pairs


def train_site_head(
    pairs: Sequence[tuple[Any, str]],
    hidden: int = 64,
    steps: int = 1500,
    seed: int = 0,
    names: Sequence[str] = (),
) -> tuple[SiteHead, float]:
    """A site head fitted on ``pairs`` (full batch AdamW); returns it and its training accuracy.

    ``names``: site names to keep first, in this order (a retrained head keeps its predecessor's
    slots, so a chat model that reads the site probabilities finds each site where it was);
    sites only the pairs know follow, sorted."""
    if not pairs:
        raise ValueError("no matched findings to train a site head on")
    seen = {site for _, site in pairs}
    names = [*names, *sorted(seen - set(names))]
    if len(names) > MAX_SITES:
        raise ValueError(f"{len(names)} site names, at most {MAX_SITES} fit a finding token")
    kinds: dict[str, list[str]] = {}
    for finding, site in pairs:
        kinds.setdefault(finding.kind, [])
        if site not in kinds[finding.kind]:
            kinds[finding.kind].append(site)
    x = np.stack([site_input(f) for f, _ in pairs])
    y = np.asarray([names.index(site) for _, site in pairs])
    allowed = np.asarray([[name in kinds[f.kind] for name in names] for f, _ in pairs])
    weights, accuracy = _fit_head(x, y, allowed, hidden, steps, seed)
    return SiteHead(names=names, kinds=kinds, weights=weights), accuracy
