"""SelaVPR local matching: mutual-nearest-neighbour scores, re-ranking and the local training loss.

A query map ``Q`` and a candidate map ``C`` (``N`` positions x ``C`` channels, unit vectors)
give the similarity ``S = C Q^T`` (candidate positions x query positions). Query position ``j``
is a *mutual nearest neighbour* when its best candidate position ``i*(j) = argmax_i S[i, j]``
has ``j`` as its own best query position ``argmax_j' S[i*(j), j']`` (first index on ties, as
``torch.argmax``). These are the official SelaVPR rules (``local_matching.py`` at cf6e206),
quirks included:

* the score of a candidate is the number of mutual matches, except that **exactly one mutual
  match scores 0** (there is always at least one: the global maximum of ``S``);
* positions are ignored (no spatial check, no similarity threshold);
* re-ranking orders candidates by descending score only; the global distance is discarded.

Everything is computed in float32 (float64 inputs stay float64) so that the counts follow the
same argmax decisions as the official code.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Candidates scored together by default (CPU: blocks that stay small; other devices: fewer
# kernel launches), and candidate positions per block of the similarity matrix; see
# `mutual_nn_scores` for the memory bound.
CPU_CHUNK_SIZE = 4
ACCELERATOR_CHUNK_SIZE = 128
_BLOCK_ROWS = 128


def _flatten_maps(query_local: torch.Tensor, candidates_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``[h, w, C]``/``[N, C]`` + ``[K, h, w, C]``/``[K, N, C]``; return ``[N, C]``, ``[K, N, C]``."""
    for name, tensor in (("query_local", query_local), ("candidates_local", candidates_local)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must hold floating-point features, got {tensor.dtype}")
    if query_local.ndim not in (2, 3):
        raise ValueError(f"query_local must be [h, w, C] or [N, C], got shape {tuple(query_local.shape)}")
    if candidates_local.ndim != query_local.ndim + 1:
        raise ValueError(
            f"candidates_local must be [K, *query_shape] = [K, {', '.join(map(str, query_local.shape))}], "
            f"got shape {tuple(candidates_local.shape)}"
        )
    if candidates_local.shape[0] == 0:
        raise ValueError("empty candidate list: candidates_local has K = 0 maps")
    if candidates_local.shape[1:] != query_local.shape:
        raise ValueError(
            f"query and candidate local features differ in shape: query {tuple(query_local.shape)}, "
            f"each candidate {tuple(candidates_local.shape[1:])} (positions and channels must match)"
        )
    if query_local[..., 0].numel() == 0 or query_local.shape[-1] == 0:
        raise ValueError(f"local feature maps are empty: shape {tuple(query_local.shape)}")
    if query_local.device != candidates_local.device:
        raise ValueError(f"query_local is on device {query_local.device} but candidates_local on {candidates_local.device}")
    channels = query_local.shape[-1]
    return query_local.reshape(-1, channels), candidates_local.reshape(candidates_local.shape[0], -1, channels)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_size(chunk_size: int | None, device: torch.device) -> int:
    """``chunk_size``, validated, or the default for ``device``."""
    if chunk_size is None:
        return CPU_CHUNK_SIZE if device.type == "cpu" else ACCELERATOR_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _mutual_nearest(query_t: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of query positions among ``k`` candidate maps.

    ``query_t`` ``[C, Nq]`` (one query) or ``[k, C, Nq]`` (one per candidate), ``candidates``
    ``[k, Nc, C]``. Returns ``i*(j)`` ``[k, Nq]`` and the mutual mask ``[k, Nq]``. The similarity
    is computed ``_BLOCK_ROWS`` candidate positions at a time, never as a whole ``Nc x Nq``
    matrix: each block finishes the best query position of its rows and updates a running
    best candidate position per query position (first index on ties, as ``torch.argmax``).
    Autocast is switched off: the decisions are made on the inputs' own precision.
    """
    device = candidates.device
    rows, columns = candidates.shape[1], query_t.shape[-1]
    best_query = torch.empty(candidates.shape[:2], dtype=torch.long, device=device)
    with torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext():
        for start in range(0, rows, _BLOCK_ROWS):
            similarity = torch.matmul(candidates[:, start : start + _BLOCK_ROWS], query_t)  # [k, b, Nq]
            best_query[:, start : start + _BLOCK_ROWS] = similarity.argmax(dim=2)
            if start == 0:
                column_max, best_candidate = similarity.max(dim=1)
                del similarity
                continue
            block_max = similarity.amax(dim=1)
            better = block_max > column_max  # strict: on ties the earlier block, i.e. the first index, wins
            column_max = torch.where(better, block_max, column_max)
            # The strided argmax over a block's rows costs as much as its matrix product; it is
            # only needed where the running maximum changed, which gets rarer block after block.
            which, column = better.nonzero(as_tuple=True)
            best_candidate[which, column] = similarity[which, :, column].argmax(dim=1) + start
            del similarity  # freed before the next block is allocated
    mutual = best_query.gather(1, best_candidate) == torch.arange(columns, device=device)
    return best_candidate, mutual


def mutual_nn_scores(
    query_local: torch.Tensor, candidates_local: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Official SelaVPR local score of every candidate: its number of mutual nearest neighbours.

    ``query_local`` ``[h, w, C]`` (or ``[N, C]``), ``candidates_local`` ``[K, h, w, C]`` (or
    ``[K, N, C]``), on one device. Returns ``[K]`` float32 counts; a candidate with exactly one
    mutual match scores 0, as in the official code.

    Candidates are scored ``chunk_size`` at a time, and for each chunk the similarities are
    computed 128 candidate positions at a time, so the working memory is bounded whatever
    ``K`` is: about ``chunk_size * N * (512 + 50)`` bytes (``N = h * w``: a 128-row block of
    float32 similarities, plus index and running-maximum vectors), plus a float32 copy of the
    chunk when the inputs are half precision. At the official 61 x 61 maps that is 8 MB for
    the CPU default ``chunk_size = 4`` and 270 MB for the default of other devices, 128
    (fewer, larger kernel launches). The official code builds all ``K`` full similarity
    matrices at once (5.5 GB for K = 100).
    """
    query, candidates = _flatten_maps(query_local, candidates_local)
    chunk_size = _chunk_size(chunk_size, candidates.device)
    dtype = _compute_dtype(query)
    query_t = query.to(dtype).T
    counts = []
    for chunk in candidates.split(chunk_size):
        _, mutual = _mutual_nearest(query_t, chunk.to(dtype))
        counts.append(mutual.sum(dim=1))
    counts = torch.cat(counts)
    return torch.where(counts == 1, 0, counts).float()


def rerank(
    query_local: torch.Tensor,
    candidates_local: torch.Tensor,
    global_order: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank candidates by descending mutual-NN score (SelaVPR's rule), ties in global order.

    ``global_order`` ``[K]`` lists the candidate indices (into ``candidates_local``) best first
    by global descriptor distance; by default the candidates are already in that order, as the
    official code stacks them. Returns ``(order, scores)``: ``order`` ``[K]`` int64, candidate
    indices best first after re-ranking, and ``scores`` ``[K]`` float32 per candidate in input
    order.

    Only the local score counts; the global ranking merely breaks ties (a stable sort). The
    official ``scores.argsort()[::-1]`` is numpy's unstable, SIMD-dispatched sort, so its
    order among equal scores depends on the numpy version and the CPU; on distinct scores the
    two orders are identical.
    """
    scores = mutual_nn_scores(query_local, candidates_local, chunk_size)
    count = scores.shape[0]
    if global_order is None:
        global_order = torch.arange(count, device=scores.device)
    else:
        global_order = torch.as_tensor(global_order, device=scores.device)
        expected = torch.arange(count, device=scores.device)
        if global_order.shape != (count,) or not torch.equal(global_order.sort().values.long(), expected):
            raise ValueError(
                f"global_order must be a permutation of the {count} candidate indices, got shape "
                f"{tuple(global_order.shape)}"
            )
        global_order = global_order.long()
    ranked = torch.sort(scores[global_order], descending=True, stable=True).indices
    return global_order[ranked], scores


def mutual_nn_matches(query_local: torch.Tensor, candidate_local: torch.Tensor) -> torch.Tensor:
    """Mutual nearest neighbours of one query map and one candidate map of the same shape.

    Returns ``[M, 2]`` int64 pairs ``(query position, candidate position)`` with positions
    flattened row-major (``row * w + col``), in increasing query position; for drawing
    correspondences. ``M`` is the raw count (the score quirk for ``M = 1`` does not apply).
    """
    query, candidates = _flatten_maps(query_local, candidate_local.unsqueeze(0))
    dtype = _compute_dtype(query)
    best_candidate, mutual = _mutual_nearest(query.to(dtype).T, candidates.to(dtype))
    query_positions = mutual[0].nonzero().squeeze(1)
    return torch.stack((query_positions, best_candidate[0, query_positions]), dim=1)


def mutual_nn_similarity(
    query_local: torch.Tensor, candidate_local: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Official training similarity of paired maps (``local_sim(..., trainflag=True)``).

    ``query_local`` and ``candidate_local`` are ``[B, h, w, C]`` (or ``[B, N, C]``), paired
    along ``B``. For each pair: the mean dot product ``q_j . c_{i*(j)}`` over the mutual matches
    ``j``; when there is exactly one mutual match (the official "no match" case), the mean
    same-position dot product ``q_p . c_p`` instead. Returns ``[B]``, differentiable with
    respect to both inputs (the matching itself is not). Memory as :func:`mutual_nn_scores`
    with ``chunk_size`` pairs at a time.
    """
    if query_local.ndim not in (3, 4) or query_local.shape[0] == 0:
        raise ValueError(f"query_local must be a non-empty batch [B, h, w, C] or [B, N, C], got {tuple(query_local.shape)}")
    if candidate_local.shape != query_local.shape:
        raise ValueError(
            f"paired local features must have the same shape, got query {tuple(query_local.shape)} "
            f"and candidate {tuple(candidate_local.shape)}"
        )
    _flatten_maps(query_local[0], candidate_local[:1])
    chunk_size = _chunk_size(chunk_size, query_local.device)
    channels = query_local.shape[-1]
    queries = query_local.reshape(query_local.shape[0], -1, channels)
    candidates = candidate_local.reshape(queries.shape)
    similarities = []
    for query, candidate in zip(queries.split(chunk_size), candidates.split(chunk_size)):
        with torch.no_grad():
            dtype = _compute_dtype(query)
            best_candidate, mutual = _mutual_nearest(query.to(dtype).transpose(1, 2), candidate.to(dtype))
        matched = candidate.gather(1, best_candidate.unsqueeze(-1).expand(-1, -1, channels))
        dots = (query * matched).sum(-1)
        count = mutual.sum(dim=1)
        matched_mean = (dots * mutual).sum(dim=1) / count.clamp(min=1)
        fallback = (query * candidate).sum(-1).mean(dim=1)
        similarities.append(torch.where(count > 1, matched_mean, fallback))
    return torch.cat(similarities)


def local_triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SelaVPR's local loss over triplets of local maps ``[B, h, w, C]``.

    Per triplet ``max(0, sim(a, n) - sim(a, p) + margin)`` with :func:`mutual_nn_similarity`
    (official margin 0). ``reduction="sum"`` is the official ``LocalFeatureLoss``;
    ``"mean"`` divides by the number of triplets, which is what the official training loop
    does afterwards (``local_loss / (train_batch_size * negs_num_per_query)``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    similarity_positive = mutual_nn_similarity(anchor, positive, chunk_size)
    similarity_negative = mutual_nn_similarity(anchor, negative, chunk_size)
    losses = torch.clamp(similarity_negative - similarity_positive + margin, min=0.0)
    return losses.mean() if reduction == "mean" else losses.sum()


__all__ = [
    "ACCELERATOR_CHUNK_SIZE",
    "CPU_CHUNK_SIZE",
    "local_triplet_loss",
    "mutual_nn_matches",
    "mutual_nn_scores",
    "mutual_nn_similarity",
    "rerank",
]
