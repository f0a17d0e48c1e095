"""Recall@K as the official VPR evaluations compute it (faiss exhaustive search, first-hit rule).

The rule (SALAD ``utils/validation.py``, the deep-visual-geo-localization ``test.py``):
for each query, the top ``max(K)`` database images are retrieved; the query counts for
recall@K when any of its top-K predictions is one of its positives. Recalls are fractions
of *all* queries, so a query without positives is never counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

DEFAULT_K_VALUES = (1, 5, 10)
METRICS = ("l2", "ip")


@dataclass(frozen=True)
class RecallResult:
    """Output of :func:`compute_recalls`.

    Args:
        recalls: ``{K: fraction of queries with a positive in their top K}``.
        predictions: ``[Q, max(K)]`` int64 database indices, best first (-1 past the database size).
        distances: ``[Q, max(K)]`` float32 faiss scores (squared L2, or inner products for ``"ip"``).
    """

    recalls: dict[int, float]
    predictions: np.ndarray
    distances: np.ndarray


def check_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    """``k_values`` as a tuple of ints; ``ValueError`` unless they are increasing and positive."""
    k_values = tuple(int(k) for k in k_values)
    if not k_values or any(k < 1 for k in k_values) or list(k_values) != sorted(set(k_values)):
        raise ValueError(f"k_values must be increasing positive integers, got {list(k_values)}")
    return k_values


def _as_descriptors(array, what: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def build_index(database: np.ndarray, metric: str = "l2") -> faiss.Index:
    """A faiss exhaustive index over ``database`` ``[N, D]``: ``IndexFlatL2`` (official) or ``IndexFlatIP``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    database = _as_descriptors(database, "database descriptors")
    index = faiss.IndexFlatL2(database.shape[1]) if metric == "l2" else faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index


def search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str = "l2",
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database indices and faiss scores for every query, searched ``chunk_size`` queries at a time."""
    index = build_index(database, metric)
    queries = _as_descriptors(queries, "query descriptors")
    if queries.shape[1] != index.d:
        raise ValueError(f"query descriptors have dimension {queries.shape[1]} but database descriptors have {index.d}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be positive, got k={k}, chunk_size={chunk_size}")
    distances = np.empty((len(queries), k), dtype=np.float32)
    predictions = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        distances[start:stop], predictions[start:stop] = index.search(queries[start:stop], k)
    return distances, predictions


def search_readable(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str = "l2",
    skipped_database: Sequence[int] = (),
    skipped_queries: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` without the rows of unreadable images (their descriptors are placeholders).

    Skipped database rows are never retrieved; skipped queries are not searched. Returns the
    predictions ``[Q', k]`` as indices into the full ``database`` (``-1`` padding) and the
    indices of the ``Q'`` searched queries.
    """
    database_rows = np.setdiff1d(np.arange(len(database)), np.asarray(skipped_database, dtype=np.int64))
    query_rows = np.setdiff1d(np.arange(len(queries)), np.asarray(skipped_queries, dtype=np.int64))
    if not database_rows.size:
        raise ValueError(f"none of the {len(database)} database images could be read")
    if not query_rows.size:
        raise ValueError(f"none of the {len(queries)} query images could be read")
    readable_database = database if database_rows.size == len(database) else np.asarray(database)[database_rows]
    readable_queries = queries if query_rows.size == len(queries) else np.asarray(queries)[query_rows]
    _, found = search(readable_database, readable_queries, k, metric=metric)  # no copy when nothing was skipped
    return np.where(found >= 0, database_rows[np.maximum(found, 0)], -1), query_rows


def _positive_hits(predictions: np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """``[Q, R]`` bool: whether each prediction is one of its query's positives."""
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
    flat = (
        np.concatenate([np.asarray(p, dtype=np.int64).ravel() for p in positives])
        if lengths.sum()
        else np.empty(0, np.int64)
    )
    width = int(max(predictions.max(initial=0), flat.max(initial=0))) + 1
    pairs = np.repeat(np.arange(len(positives), dtype=np.int64), lengths) * width + flat
    rows = np.arange(len(predictions), dtype=np.int64)[:, None] * width
    return np.isin(rows + predictions, pairs) & (predictions >= 0)


def recalls_from_predictions(
    predictions: np.ndarray,
    positives: Sequence[Sequence[int]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
) -> dict[int, float]:
    """Recall@K of ranked ``predictions`` ``[Q, R]`` against per-query ``positives`` (first-hit rule).

    A query counts for every K at or above the rank of its first positive; ``-1`` entries
    (faiss' padding) never count; K larger than R counts the whole list.
    """
    k_values = check_k_values(k_values)
    predictions = np.asarray(predictions, dtype=np.int64)
    if predictions.ndim != 2 or predictions.shape[0] == 0:
        raise ValueError(f"predictions must be a non-empty [Q, R] array, got shape {list(predictions.shape)}")
    if len(positives) != len(predictions):
        raise ValueError(f"got positives for {len(positives)} queries but predictions for {len(predictions)}")
    hits = _positive_hits(predictions, positives)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float(np.count_nonzero(first_hit < k)) / len(predictions) for k in k_values}


def compute_recalls(
    database: np.ndarray,
    queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    metric: str = "l2",
    chunk_size: int = 4096,
) -> RecallResult:
    """Search ``queries`` ``[Q, D]`` in ``database`` ``[N, D]`` with faiss and score recall@K.

    ``metric="l2"`` (default) is the official ``IndexFlatL2``; ``"ip"`` (inner product) ranks
    L2-normalised descriptors the same way up to rounding.
    """
    k_values = check_k_values(k_values)
    if len(positives) != len(queries):
        raise ValueError(f"got positives for {len(positives)} queries but {len(queries)} query descriptors")
    distances, predictions = search(database, queries, max(k_values), metric=metric, chunk_size=chunk_size)
    return RecallResult(recalls_from_predictions(predictions, positives, k_values), predictions, distances)
