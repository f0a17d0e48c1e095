"""Aggregation layers: GeM pooling and SALAD's optimal-transport aggregation."""

from __future__ import annotations

import math

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p`` over the last ``dims``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=dims).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


def sinkhorn_with_dustbin(scores: torch.Tensor, dustbin: torch.Tensor, iterations: int) -> torch.Tensor:
    """Optimal-transport assignment of ``n`` features to ``m`` clusters plus a dustbin.

    ``scores`` ``[B, m, n]`` are logits; a dustbin row holding the scalar ``dustbin`` is
    appended. Row marginals are ``1/(n+m)`` per cluster and ``(n-m)/(n+m)`` for the dustbin,
    column marginals ``1/(n+m)``; log-space Sinkhorn starts from zero potentials. Returns the
    transport scaled so every column of the full (m+1)-row plan sums to one, dustbin row
    dropped: ``[B, m, n]``. Always computed in float32, whatever the autocast dtype.
    """
    batch, clusters, features = scores.shape
    if features <= clusters:
        raise ValueError(
            f"SALAD needs more patches than clusters: got {features} patches for {clusters} clusters "
            "(use a larger image or fewer clusters)"
        )
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_plan = torch.cat(
            (scores.float(), dustbin.float().reshape(1, 1, 1).expand(batch, 1, features)), dim=1
        )
        log_norm = -math.log(features + clusters)
        log_rows = torch.full((clusters + 1,), log_norm, device=scores.device)
        log_rows[-1] += math.log(features - clusters)
        log_cols = torch.full((features,), log_norm, device=scores.device)
        u = torch.zeros(batch, clusters + 1, 1, device=scores.device)
        v = torch.zeros(batch, 1, features, device=scores.device)
        for _ in range(iterations):
            u = log_rows[:, None] - torch.logsumexp(log_plan + v, dim=2, keepdim=True)
            v = log_cols[None, :] - torch.logsumexp(log_plan + u, dim=1, keepdim=True)
        return torch.exp(log_plan + u + v - log_norm)[:, :-1]


class SaladAggregator(nn.Module):
    """SALAD: cluster features weighted by a Sinkhorn assignment, plus a global scene token.

    The weighted sums ``V[b, c, k] = sum_j f[b, c, j] p[b, k, j]`` are one batched matrix
    product; no ``B x l x m x n`` tensor is ever built.
    """

    def __init__(
        self,
        in_channels: int,
        num_clusters: int,
        cluster_dim: int,
        token_dim: int,
        hidden_dim: int,
        dropout: float,
        dustbin_init: float,
        sinkhorn_iterations: int,
    ) -> None:
        super().__init__()
        self.sinkhorn_iterations = sinkhorn_iterations
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_features = nn.Sequential(
            nn.Linear(in_channels, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), drop, nn.ReLU(), nn.Conv2d(hidden_dim, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), drop, nn.ReLU(), nn.Conv2d(hidden_dim, num_clusters, 1)
        )
        self.dust_bin = nn.Parameter(torch.tensor(float(dustbin_init)))

    def forward(self, feature_map: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feature_map`` ``[B, C, h, w]``, ``token`` ``[B, C]`` -> (descriptor ``[B, m*l+g]``, assignment ``[B, m, n]``)."""
        features = self.cluster_features(feature_map).flatten(2)
        assignment = sinkhorn_with_dustbin(self.score(feature_map).flatten(2), self.dust_bin, self.sinkhorn_iterations)
        clusters = torch.bmm(features.float(), assignment.transpose(1, 2))
        clusters = nn.functional.normalize(clusters, dim=1).flatten(1)
        scene = nn.functional.normalize(self.token_features(token).float(), dim=-1)
        return nn.functional.normalize(torch.cat((scene, clusters), dim=-1), dim=-1), assignment
