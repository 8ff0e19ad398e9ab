"""The Plane-Slice-Aware Transformer (PSAT) of Med3DInsight.

Learnable queries read the 3D encoder's tokens through a stack of decoder layers
(self-attention among the queries, cross-attention to the 3D tokens, FFN; torch's
``nn.TransformerDecoderLayer``). A learnable plane x slice table (axial / coronal / sagittal
by slice-index bin) gives one vector per (plane, slice) that is added to every query and every
3D token, so the same volume answers differently for each plane and slice. The first query's
output, projected, is the 3D embedding of that plane and slice: the thing trained to match the
frozen 2D model's embedding of that very slice image and of its text.

Beyond the reference (``Qybc/Anonymous`` ``models/psat.py``): the 3D tokens also get a learnable
position embedding over the token grid, so cross-attention can tell where a token lies and
therefore which tokens a given slice cuts through (without it attention is order-blind).
"""

from __future__ import annotations

import torch
from torch import nn

PLANES = ("axial", "coronal", "sagittal")
#: Array axis (z, y, x) a plane's slice index runs along.
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


class PlaneSliceAwareTransformer(nn.Module):
    """Queries + plane x slice table -> one embedding per (3D tokens, plane, slice)."""

    def __init__(
        self,
        token_channels: int,
        token_grid: tuple[int, int, int],
        hidden: int = 768,
        queries: int = 300,
        layers: int = 6,
        heads: int = 8,
        ffn: int = 2048,
        slice_bins: int = 64,
        out_dim: int = 768,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.slice_bins = slice_bins
        self.token_proj = nn.Linear(token_channels, hidden)
        num_tokens = token_grid[0] * token_grid[1] * token_grid[2]
        self.token_position = nn.Parameter(torch.zeros(1, num_tokens, hidden))
        self.queries = nn.Parameter(torch.empty(queries, hidden))
        self.plane_slice = nn.Parameter(torch.empty(len(PLANES), slice_bins, hidden))
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.plane_slice, std=0.02)
        nn.init.normal_(self.token_position, std=0.02)
        layer = nn.TransformerDecoderLayer(
            d_model=hidden, nhead=heads, dim_feedforward=ffn, dropout=dropout, batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=layers, norm=nn.LayerNorm(hidden))
        self.out_proj = nn.Linear(hidden, out_dim)

    def plane_slice_vector(self, planes: torch.Tensor, slice_fraction: torch.Tensor) -> torch.Tensor:
        """(N,) plane index and (N,) slice position in [0, 1) -> (N, hidden) table rows."""
        bins = (slice_fraction.clamp(0.0, 0.999999) * self.slice_bins).long()
        return self.plane_slice[planes, bins]

    def forward(self, tokens: torch.Tensor, planes: torch.Tensor, slice_fraction: torch.Tensor) -> torch.Tensor:
        """``tokens`` (N, T, C) 3D tokens, one row per query set; -> (N, out_dim) embeddings."""
        if tokens.shape[1] != self.token_position.shape[1]:
            raise ValueError(
                f"PSAT was built for {self.token_position.shape[1]} tokens, got {tokens.shape[1]} "
                "(the crop must match the config's patch_size)"
            )
        position = self.plane_slice_vector(planes, slice_fraction)[:, None, :]  # (N, 1, H)
        memory = self.token_proj(tokens) + self.token_position + position
        queries = self.queries[None].expand(tokens.shape[0], -1, -1) + position
        decoded = self.decoder(queries, memory)
        return self.out_proj(decoded[:, 0])
