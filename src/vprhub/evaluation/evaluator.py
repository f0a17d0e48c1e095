"""Evaluate a model on a test set: extract, search, (re-rank), score recall@K."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .extract import extract_descriptors
from .recall import DEFAULT_K_VALUES, check_k_values, recalls_from_predictions, search_readable
from .testset import VPRTestSet

# (query local map [h, w, C], candidate maps [K, h, w, C]) -> one score per candidate, higher is better
LocalScorer = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]
DEFAULT_RERANK_NUM = 100


def default_local_scorer() -> LocalScorer:
    """SelaVPR's mutual-nearest-neighbour count (``vprhub.modeling.local_matching.mutual_nn_scores``)."""
    from ..modeling.local_matching import mutual_nn_scores

    return mutual_nn_scores


def rerank_predictions(
    predictions: np.ndarray,
    query_local: np.ndarray,
    database_local: np.ndarray,
    scorer: LocalScorer,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Reorder each query's candidates ``[Q, K]`` by descending local score (SelaVPR's rule).

    The global ranking is discarded except to break ties: equal scores keep their global order
    (a stable sort; the official unstable ``argsort()[::-1]`` may order ties differently).
    ``-1`` padding stays at the end.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    reranked = np.full_like(predictions, -1)
    for query, candidates in enumerate(tqdm(predictions, desc="re-ranking", unit="query", disable=not progress)):
        candidates = candidates[candidates >= 0]
        query_map = torch.from_numpy(np.asarray(query_local[query], dtype=np.float32)).to(device)
        candidate_maps = torch.from_numpy(np.asarray(database_local[candidates], dtype=np.float32)).to(device)
        scores = torch.as_tensor(scorer(query_map, candidate_maps)).float().cpu().numpy().reshape(-1)
        if scores.shape != candidates.shape:
            raise ValueError(f"the local scorer returned {scores.shape[0]} scores for {len(candidates)} candidates")
        reranked[query, : len(candidates)] = candidates[np.argsort(-scores, kind="stable")]
    return reranked


def evaluate_model(
    model: torch.nn.Module,
    image_processor,
    test_set: VPRTestSet,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    metric: str = "l2",
    rerank: bool = False,
    rerank_num: int = DEFAULT_RERANK_NUM,
    local_scorer: LocalScorer | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Recall@K of ``model`` on ``test_set``; database and queries are extracted separately, in order.

    With ``rerank`` the top ``rerank_num`` global candidates are reordered by ``local_scorer``
    (default: :func:`default_local_scorer`) on the model's ``local_features``; the first-stage
    recalls are reported as ``global_recall@K``.

    Unreadable images are skipped: a skipped query is not evaluated (recalls are fractions of
    ``evaluated_queries``), a skipped database image is never retrieved.

    Returns a JSON-ready dict: ``dataset``, ``recall@K`` (fractions), ``num_queries``,
    ``evaluated_queries``, ``num_database``, ``queries_without_positives`` (among the evaluated),
    ``excluded_queries``, ``skipped_queries`` and ``skipped_database`` (unreadable files),
    ``reranked``, ``seconds``.
    """
    k_values = check_k_values(k_values)
    if rerank and rerank_num < 1:
        raise ValueError(f"rerank_num must be positive, got {rerank_num}")
    scorer = (local_scorer or default_local_scorer()) if rerank else None
    start = time.perf_counter()
    options = dict(
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        progress=progress,
        num_workers=num_workers,
        return_local=rerank,
    )
    name = test_set.name
    skipped_database: list[dict] = []
    skipped_queries: list[dict] = []
    database = extract_descriptors(
        model, image_processor, test_set.database_paths, desc=f"{name} database", skipped=skipped_database, **options
    )
    queries = extract_descriptors(
        model, image_processor, test_set.query_paths, desc=f"{name} queries", skipped=skipped_queries, **options
    )
    depth = max(max(k_values), rerank_num) if rerank else max(k_values)
    if rerank:
        (database, database_local), (queries, query_local) = database, queries
    predictions, query_rows = search_readable(
        database,
        queries,
        depth,
        metric,
        [item["index"] for item in skipped_database],
        [item["index"] for item in skipped_queries],
    )
    positives = [test_set.positives[i] for i in query_rows]
    result = {"dataset": name}
    recalls = recalls_from_predictions(predictions, positives, k_values)
    if rerank:  # re-ranking refuses unreadable images, so every row is here
        result.update({f"global_recall@{k}": value for k, value in recalls.items()})
        reranked = rerank_predictions(
            predictions[:, :rerank_num], query_local, database_local, scorer, device, progress
        )
        recalls = recalls_from_predictions(reranked, positives, k_values)
    result.update({f"recall@{k}": value for k, value in recalls.items()})
    result.update(
        num_queries=test_set.num_queries,
        evaluated_queries=len(query_rows),
        num_database=test_set.num_database,
        queries_without_positives=sum(1 for p in positives if p.size == 0),
        excluded_queries=test_set.excluded_queries,
        skipped_queries=[item["input"] for item in skipped_queries],
        skipped_database=[item["input"] for item in skipped_database],
        reranked=rerank,
        seconds=round(time.perf_counter() - start, 3),
    )
    return result
