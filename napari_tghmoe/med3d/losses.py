"""Med3DInsight's alignment losses: partial optimal transport over a learnable Mahalanobis
distance (the paper's), InfoNCE (the recipe switch), plus MSE volume reconstruction.

Partial OT (POT ``ot.partial.entropic_partial_wasserstein``, reg 0.03, mass 0.95): the B x B
cost between the 3D embeddings and the 2D targets is a Mahalanobis distance
``sqrt((x - y)^T L L^T (x - y))`` (``L`` learnable, so ``M = L L^T`` stays positive
semi-definite), divided by its largest entry. The plan ``pi`` moves only 95 % of the mass, so a
few slices with no good partner (blank slices, near-duplicate texts) are not forced to match.
The loss is the cross-entropy of the plan against the identity matching,
``-sum(I/B * log pi)``: it rises when a 3D embedding's mass goes to another slice's target.

How gradients flow: the loss is a function of the plan alone (the cost does not appear in it),
so the plan cannot be a constant. POT runs its Sinkhorn-like iterations in the tensors' own
backend; with torch tensors every iteration is a differentiable torch op, and autograd
backpropagates through the unrolled iterations into the cost, hence into the embeddings and
``L``. (The reference does the same: it passes torch tensors to POT and backpropagates
``-pi_hat * log(pi)``.) ``tests/test_med3d.py`` checks that the gradient reaches ``L``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Floor inside the log: plans are entropic, so entries are positive but can underflow.
_LOG_FLOOR = 1e-12


def mahalanobis_cost(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D), (D, D) -> (B, B) ``sqrt((x_i - y_j)^T L L^T (x_i - y_j))`` / its max."""
    projected_x = x @ factor
    projected_y = y @ factor
    squared = (projected_x[:, None, :] - projected_y[None, :, :]).pow(2).sum(-1)
    cost = torch.sqrt(squared + 1e-12)
    return cost / cost.max().clamp(min=1e-12)


#: Bregman iterations of the partial plan. POT's default (1000, with a stop threshold of 1e-100,
#: so always 1000) gives the same plan to 1e-9 as 100 on 16 x 16 batches here, and every
#: iteration is unrolled for backpropagation, so 100 is 7x cheaper for the same gradient.
OT_ITERATIONS = 100


def partial_ot_plan(cost: torch.Tensor, reg: float = 0.03, mass: float = 0.95) -> torch.Tensor:
    """Entropic partial transport plan between two uniform batches (POT, torch backend)."""
    import ot

    batch = cost.shape[0]
    weights = torch.full((batch,), 1.0 / batch, dtype=cost.dtype, device=cost.device)
    return ot.partial.entropic_partial_wasserstein(
        weights, weights, cost, reg=reg, m=mass, numItermax=OT_ITERATIONS, stopThr=1e-9
    )


def partial_ot_loss(
    x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor, reg: float = 0.03, mass: float = 0.95
) -> torch.Tensor:
    """``-sum(I/B * log pi)`` for the partial OT plan ``pi`` of the Mahalanobis cost."""
    batch = x.shape[0]
    plan = partial_ot_plan(mahalanobis_cost(x, y, factor), reg=reg, mass=mass)
    plan = torch.nan_to_num(plan, nan=0.0)
    return -(torch.log(torch.diagonal(plan).clamp(min=_LOG_FLOOR))).sum() / batch


def info_nce_loss(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP-style) between matched rows of ``x`` and ``y``."""
    logits = x @ y.t() / temperature
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def alignment_loss(
    embedding: torch.Tensor,
    image_target: torch.Tensor,
    text_target: torch.Tensor,
    factor: torch.Tensor,
    *,
    align: str = "ot",
    reg: float = 0.03,
    mass: float = 0.95,
    temperature: float = 0.07,
) -> dict[str, torch.Tensor]:
    """3D<->image plus 3D<->text alignment of L2-normalised embeddings (OT or InfoNCE)."""
    med = F.normalize(embedding.float(), dim=-1)
    image = F.normalize(image_target.float(), dim=-1)
    text = F.normalize(text_target.float(), dim=-1)
    if align == "ot":
        to_image = partial_ot_loss(med, image, factor, reg=reg, mass=mass)
        to_text = partial_ot_loss(med, text, factor, reg=reg, mass=mass)
    elif align == "infonce":
        to_image = info_nce_loss(med, image, temperature)
        to_text = info_nce_loss(med, text, temperature)
    else:
        raise ValueError(f"align must be 'ot' or 'infonce', got {align!r}")
    return {"image": to_image, "text": to_text}


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(reconstruction, target)
