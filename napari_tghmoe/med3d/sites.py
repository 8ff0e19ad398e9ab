"""Where a finding lies, in a report's words: the site head of the scan evidence (issue 15).

The organ model names the structure a finding touches ("left kidney", "aorta"); a report names a
site ("left kidney, lower pole", "subcarinal region", "left pleural space"). The site head is a
small classifier from a finding's evidence (kind, organ, position in the body, in its organ's box
and relative to the aorta; :mod:`napari_tghmoe.med3d.evidence`) to the site names a kind was seen
at in training. It is trained on the cascade's own findings matched to phantom truth
(:func:`training_pairs`), so it learns the cascade's habits too (a para-aortic node the organ
model calls "left kidney"). It lives beside the cascade in a chat model's evidence folder
(``sites.safetensors`` + ``sites.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SITE_WEIGHTS = "sites.safetensors"
SITE_CONFIG = "sites.json"
#: Site slots of a finding token (the head's names, zero-padded).
MAX_SITES = 32


def site_input(finding: Any) -> np.ndarray:
    """The head's input: a finding token's geometry and identity (no certainty: a site is a site)."""
    from napari_tghmoe.med3d.evidence import finding_geometry_vector

    return finding_geometry_vector(finding)


@dataclass
class SiteHead:
    """A softmax classifier over ``names``, restricted to the names each kind was seen at."""

    names: list[str]
    kinds: dict[str, list[str]]  # kind -> allowed names
    weights: dict[str, np.ndarray]  # w1 (F, H), b1 (H), w2 (H, S), b2 (S)

    def probabilities(self, finding: Any) -> np.ndarray:
        """(len(names),) probabilities of the finding's site (zeros for a kind never seen)."""
        x = site_input(finding)
        hidden = np.maximum(x @ self.weights["w1"] + self.weights["b1"], 0.0)
        logits = hidden @ self.weights["w2"] + self.weights["b2"]
        allowed = np.asarray([name in self.kinds.get(finding.kind, ()) for name in self.names])
        if not allowed.any():
            return np.zeros(len(self.names), dtype=np.float32)
        logits = np.where(allowed, logits, -np.inf)
        exp = np.exp(logits - logits[allowed].max())
        return (exp / exp.sum()).astype(np.float32)

    def site(self, finding: Any) -> tuple[str | None, float]:
        probs = self.probabilities(finding)
        if not probs.any():
            return None, 0.0
        best = int(np.argmax(probs))
        return self.names[best], float(probs[best])

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}, str(folder / SITE_WEIGHTS))
        (folder / SITE_CONFIG).write_text(json.dumps({"names": self.names, "kinds": self.kinds}, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> SiteHead | None:
        """The head saved in ``folder``, or None when there is none."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / SITE_CONFIG).is_file():
            return None
        config = json.loads((folder / SITE_CONFIG).read_text(encoding="utf-8"))
        weights = load_file(str(folder / SITE_WEIGHTS))
        return cls(names=list(config["names"]), kinds={k: list(v) for k, v in config["kinds"].items()}, weights=weights)


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
    pairs: Sequence[tuple[Any, str]], hidden: int = 64, steps: int = 1500, seed: int = 0
) -> tuple[SiteHead, float]:
    """A site head fitted on ``pairs`` (full batch Adam, weight decay); returns it and its
    training accuracy."""
    import torch

    if not pairs:
        raise ValueError("no matched findings to train a site head on")
    names = sorted({site for _, site in pairs})
    if len(names) > MAX_SITES:
        raise ValueError(f"{len(names)} site names, at most {MAX_SITES} fit a finding token")
    kinds: dict[str, list[str]] = {}
    for finding, site in pairs:
        kinds.setdefault(finding.kind, [])
        if site not in kinds[finding.kind]:
            kinds[finding.kind].append(site)
    x = torch.tensor(np.stack([site_input(f) for f, _ in pairs]), dtype=torch.float32)
    y = torch.tensor([names.index(site) for _, site in pairs])
    mask = torch.tensor([[name in kinds[f.kind] for name in names] for f, _ in pairs])
    generator = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(x.shape[1], hidden, generator=generator) / np.sqrt(x.shape[1])).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, len(names), generator=generator) / np.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(len(names), requires_grad=True)
    optimiser = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        logits = torch.relu(x @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.cross_entropy(logits.masked_fill(~mask, -1e9), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        logits = (torch.relu(x @ w1 + b1) @ w2 + b2).masked_fill(~mask, -1e9)
        accuracy = float((logits.argmax(1) == y).float().mean())
    weights = {name: tensor.detach().numpy().copy() for name, tensor in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2))}
    return SiteHead(names=names, kinds=kinds, weights=weights), accuracy
