"""SelaVPR's training batches: triplets mined from a cache of descriptors, and the triplet loss.

Official recipe (Lu-Feng/SelaVPR ``train.py``, ``datasets_ws.py``, "partial" mining): every
``cache_refresh_rate`` (1000) queries, draw that many queries and ``negative_samples`` (1000)
database images at random, describe them (and the queries' hard positives) with the current
model in eval mode, then give each query its nearest hard positive (within 10 m, L2 in
descriptor space) and its ``negatives_per_query`` (2) nearest sampled database images that
are not soft positives (within 25 m). Batches hold ``queries_per_batch`` (4) such groups
``[query, positive, negative 1, negative 2]``; ``queries_per_epoch`` (5000) queries make an
epoch. The loss is the triplet margin loss (L2, margin 0.1) averaged over the
``queries x negatives`` triplets, plus the local mutual-nearest-neighbour loss on them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.geo_triplets import GeoTriplets
from .losses import BatchTooSmallError, LossOutput

# descriptors [len(indices), D] of global image indices (database first, then queries)
Describe = Callable[[np.ndarray], np.ndarray]


def nearest(query: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """Indices (into ``candidates``) of the ``count`` rows nearest ``query`` in L2, nearest first, ties by index."""
    distances = ((candidates.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    return np.argsort(distances, kind="stable")[:count]


def mine_triplets(
    data: GeoTriplets,
    queries: np.ndarray,
    sampled_database: np.ndarray,
    cache: dict[int, np.ndarray],
    negatives_per_query: int,
) -> np.ndarray:
    """``[len(queries), 2 + negatives_per_query]`` global indices: query, best positive, hardest negatives.

    ``cache`` maps global indices (database ``i``, query ``num_database + q``) to descriptors;
    it holds ``sampled_database``, the queries and their hard positives.
    """
    rows = []
    for query in queries:
        features = cache[data.num_database + int(query)]
        positives = data.hard_positives[query]
        positive = positives[nearest(features, np.stack([cache[int(i)] for i in positives]), 1)[0]]
        candidates = np.setdiff1d(sampled_database, data.soft_positives[query], assume_unique=True)
        if len(candidates) < negatives_per_query:
            raise ValueError(
                f"query {query}: only {len(candidates)} sampled database images are not within the soft radius; "
                f"need {negatives_per_query} negatives (sample more database images)"
            )
        hardest = candidates[nearest(features, np.stack([cache[int(i)] for i in candidates]), negatives_per_query)]
        rows.append([data.num_database + int(query), int(positive), *hardest.tolist()])
    return np.asarray(rows, dtype=np.int64)


class CachedTripletSampler(torch.utils.data.Sampler):
    """Batches of mined triplet groups; mining calls ``describe`` with the current model.

    Each epoch is ``queries_per_epoch // cache_refresh_rate`` rounds; a round draws its queries
    and database sample from ``(seed, epoch, round)``, describes them, mines, and yields
    ``cache_refresh_rate // queries_per_batch`` batches (the last incomplete one is dropped, as
    the official loader does). A batch is a list of ``(global_index, sample_seed)`` pairs, the
    ``2 + negatives_per_query`` images of a query contiguous. Every process draws the same
    rounds and mines the same triplets (``describe`` must return the same descriptors
    everywhere, e.g. gathered); accelerate hands each process its share of the batches.
    Set ``describe`` before iterating.
    """

    def __init__(
        self,
        data: GeoTriplets,
        queries_per_batch: int = 4,
        negatives_per_query: int = 2,
        negative_samples: int = 1000,
        cache_refresh_rate: int = 1000,
        queries_per_epoch: int = 5000,
        seed: int = 0,
    ):
        if queries_per_epoch % cache_refresh_rate:
            raise ValueError(
                f"queries_per_epoch ({queries_per_epoch}) must be a multiple of cache_refresh_rate "
                f"({cache_refresh_rate})"
            )
        if cache_refresh_rate > data.num_queries:
            raise ValueError(f"cache_refresh_rate ({cache_refresh_rate}) exceeds the {data.num_queries} queries")
        if negative_samples > data.num_database:
            raise ValueError(f"negative_samples ({negative_samples}) exceeds the {data.num_database} database images")
        if min(queries_per_batch, negatives_per_query) < 1 or cache_refresh_rate < queries_per_batch:
            raise ValueError(
                "need queries_per_batch >= 1, negatives_per_query >= 1 and cache_refresh_rate >= queries_per_batch, "
                f"got {queries_per_batch}, {negatives_per_query}, {cache_refresh_rate}"
            )
        self.data = data
        self.queries_per_batch, self.negatives_per_query = queries_per_batch, negatives_per_query
        self.negative_samples, self.cache_refresh_rate = negative_samples, cache_refresh_rate
        self.rounds = queries_per_epoch // cache_refresh_rate
        self.batch_size = queries_per_batch * (2 + negatives_per_query)
        self.seed, self.epoch = seed, 0
        self.describe: Describe | None = None
        self.last_round: dict | None = None  # queries, sampled database and triplets of the last mining

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.rounds * (self.cache_refresh_rate // self.queries_per_batch)

    def draw(self, round_number: int) -> tuple[np.ndarray, np.ndarray]:
        """The queries and database sample of one round."""
        rng = np.random.default_rng([self.seed, self.epoch, round_number])
        queries = rng.choice(self.data.num_queries, self.cache_refresh_rate, replace=False)
        database = np.sort(rng.choice(self.data.num_database, self.negative_samples, replace=False))
        return queries, database

    def mine(self, round_number: int) -> np.ndarray:
        """Describe the round's images with ``describe`` and mine its triplet groups."""
        if self.describe is None:
            raise RuntimeError("CachedTripletSampler.describe is not set")
        queries, database = self.draw(round_number)
        positives = np.concatenate([self.data.hard_positives[q] for q in queries])
        indices = np.unique(np.concatenate([database, positives, self.data.num_database + queries]))
        cache = dict(zip(indices.tolist(), self.describe(indices), strict=True))
        triplets = mine_triplets(self.data, queries, database, cache, self.negatives_per_query)
        self.last_round = {"queries": queries, "database": database, "cache": cache, "triplets": triplets}
        return triplets

    def __iter__(self):
        per_round = self.cache_refresh_rate // self.queries_per_batch
        for round_number in range(self.rounds):
            groups = self.mine(round_number)
            seeds = np.random.default_rng([self.seed, self.epoch, round_number, 1]).integers(
                0, 2**63 - 1, size=groups.shape, dtype=np.int64
            )
            for batch in range(per_round):
                rows = slice(batch * self.queries_per_batch, (batch + 1) * self.queries_per_batch)
                yield list(zip(groups[rows].reshape(-1).tolist(), seeds[rows].reshape(-1).tolist(), strict=True))


class TripletObjective(torch.nn.Module):
    """Triplet margin loss (L2, ``margin``) over the ``[query, positive, negatives...]`` groups of a batch.

    Each group gives ``negatives_per_query`` triplets; the loss is their mean (the official sum
    divided by ``queries x negatives``). ``batch_acc`` is the fraction of triplets already
    satisfying the margin.
    """

    def __init__(self, margin: float = 0.1, negatives_per_query: int = 2):
        super().__init__()
        self.margin, self.negatives_per_query = margin, negatives_per_query

    def triplets(self, batch_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """``(anchors, positives, negatives)`` indices of a batch of ``batch_size`` images."""
        group = 2 + self.negatives_per_query
        if batch_size == 0 or batch_size % group:
            raise BatchTooSmallError(
                f"a triplet batch holds groups of {group} images (query, positive, {self.negatives_per_query} "
                f"negatives); got {batch_size} images (unreadable images were skipped)"
            )
        starts = torch.arange(0, batch_size, group, device=device).repeat_interleave(self.negatives_per_query)
        offsets = torch.arange(self.negatives_per_query, device=device).repeat(batch_size // group)
        return starts, starts + 1, starts + 2 + offsets

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor | None = None) -> LossOutput:
        anchors, positives, negatives = self.triplets(len(descriptors), descriptors.device)
        descriptors = descriptors.float()
        per_triplet = torch.nn.functional.triplet_margin_loss(
            descriptors[anchors], descriptors[positives], descriptors[negatives], margin=self.margin, p=2,
            reduction="none",
        )  # fmt: skip
        satisfied = float((per_triplet.detach() == 0).float().mean())
        return LossOutput(per_triplet.mean(), satisfied, (anchors, positives, negatives), len(descriptors))
