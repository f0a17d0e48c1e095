"""GeM pooling over the cells of k x k splits of a patch grid (CricaVPR's regional tokens).

Cell rule: a side of ``n`` patches is cut into ``k`` parts at the boundaries
``b_i = floor(i * n / k + 1/2)`` (``i * n / k`` rounded half up), ``i = 0 .. k``. On CricaVPR's
16 x 16 grid this gives exactly the official hand-written cells: ``[0:8], [8:16]`` for k = 2
and ``[0:5], [5:11], [11:16]`` for k = 3. Every part is non-empty as long as ``n >= k``.
Cells are ordered split by split, row-major inside a split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def check_grid(grid: tuple[int, int], splits: Sequence[int], patch_size: int | None = None) -> None:
    """Raise a ``ValueError`` when the grid has fewer rows or columns than the largest split."""
    needed = max(splits)
    if min(grid) < needed:
        pixels = f" (images of at least {needed * patch_size}x{needed * patch_size} pixels)" if patch_size else ""
        raise ValueError(
            f"the patch grid {grid[0]}x{grid[1]} is too small for the {needed}x{needed} split: "
            f"it needs at least {needed} patches per side{pixels}"
        )


def grid_cell_bounds(size: int, splits: int) -> list[int]:
    """Boundaries ``[b_0 = 0, ..., b_k = size]`` of the ``splits`` parts of one grid side."""
    return [(2 * i * size + splits) // (2 * splits) for i in range(splits + 1)]


def _side_weights(size: int, splits: int, device: torch.device) -> torch.Tensor:
    """``[size, splits]``: column ``i`` averages the positions of part ``i``."""
    bounds = torch.tensor(grid_cell_bounds(size, splits), device=device)
    part = torch.bucketize(torch.arange(size, device=device), bounds[1:-1], right=True)
    members = nn.functional.one_hot(part, splits).float()
    return members / members.sum(dim=0)


def grid_cell_weights(grid: tuple[int, int], splits: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Averaging weights ``[num_cells, h * w]`` of every cell over the row-major patch positions."""
    check_grid(grid, splits)
    cells = []
    for k in splits:
        rows, cols = _side_weights(grid[0], k, device), _side_weights(grid[1], k, device)
        cells.append(torch.einsum("ri,cj->ijrc", rows, cols).reshape(k * k, grid[0] * grid[1]))
    return torch.cat(cells)


class GridGeM(nn.Module):
    """GeM (learnable ``p``) over the L2-normalised patch tokens of every cell of every split.

    All cells are pooled by one matrix product with the cell-averaging weights.
    """

    def __init__(self, splits: Sequence[int], p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.splits = tuple(splits)
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    @property
    def num_cells(self) -> int:
        return sum(k * k for k in self.splits)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``patch_tokens`` ``[B, h*w, D]`` (row-major) -> cell vectors ``[B, num_cells, D]``."""
        if patch_tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{patch_tokens.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        weights = grid_cell_weights(grid, self.splits, patch_tokens.device).to(patch_tokens.dtype)
        powered = nn.functional.normalize(patch_tokens, dim=-1).clamp(min=self.eps).pow(self.p)
        return torch.matmul(weights, powered).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"splits={self.splits}, p={self.p.item():.4f}, eps={self.eps}"


__all__ = ["GridGeM", "check_grid", "grid_cell_bounds", "grid_cell_weights"]
