"""Place batches: P places x K images each, as GSV-Cities training does."""

from __future__ import annotations

import numpy as np
import torch


class PlaceBatchSampler(torch.utils.data.Sampler):
    """Yield batches of ``places_per_batch`` (P) places x ``images_per_place`` (K) images.

    Each epoch visits every place with at least K images once, in an order drawn from
    ``(seed, epoch)`` (from ``seed`` alone with ``reshuffle_places=False``: the same order every
    epoch, as CricaVPR's loader), and picks K distinct images of each place at random.  With
    ``drop_last=False`` the last batch holds the remaining places (the official loaders keep it).  A batch is a
    list of ``(image_index, sample_seed)`` pairs, images of a place contiguous; the
    per-sample seed drives data augmentation so that it does not depend on worker
    processes or on where a run was resumed.

    With ``groups`` (e.g. the city of every image), an epoch walks the groups in increasing
    order and shuffles places only within a group, so a batch holds places of one city (the
    official GSV-Cities loaders read the cities one after the other, unshuffled across cities);
    without, places are shuffled globally.

    The order is a pure function of ``(seed, epoch)``, so every process of a distributed
    run draws the same sequence and ``accelerate``'s ``BatchSamplerShard`` hands each
    process its own batches; ``batch_size`` (P x K) is exposed for it.  Call
    ``set_epoch`` before iterating (``accelerate``'s data loaders do it for a
    single-process run).
    """

    def __init__(
        self,
        labels: np.ndarray,
        places_per_batch: int,
        images_per_place: int,
        seed: int = 0,
        drop_last: bool = True,
        groups: np.ndarray | None = None,
        reshuffle_places: bool = True,
    ):
        if places_per_batch < 2 or images_per_place < 2:
            raise ValueError(
                "multi-similarity mining needs at least 2 places per batch and 2 images per place, "
                f"got places_per_batch={places_per_batch}, images_per_place={images_per_place}"
            )
        labels = np.asarray(labels, dtype=np.int64)
        self.order = np.argsort(labels, kind="stable")
        places, self.starts, counts = np.unique(labels[self.order], return_index=True, return_counts=True)
        self.eligible = np.flatnonzero(counts >= images_per_place)
        if len(self.eligible) < places_per_batch:
            raise ValueError(
                f"only {len(self.eligible)} places have at least {images_per_place} images; "
                f"a batch needs places_per_batch={places_per_batch}"
            )
        self.counts = counts
        self.place_groups = None if groups is None else np.asarray(groups)[self.order[self.starts]]
        self.places_per_batch, self.images_per_place = places_per_batch, images_per_place
        self.batch_size = places_per_batch * images_per_place
        self.seed, self.drop_last, self.reshuffle_places, self.epoch = seed, drop_last, reshuffle_places, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.eligible), self.places_per_batch)
        return full + int(rest > 0 and not self.drop_last)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order_rng = rng if self.reshuffle_places else np.random.default_rng([self.seed])
        places = order_rng.permutation(self.eligible)
        if self.place_groups is not None:
            places = places[np.argsort(self.place_groups[places], kind="stable")]
        # K distinct random images per place: sort each place's images by a random key.
        keys = rng.random(len(self.order))
        segment = np.repeat(np.arange(len(self.counts)), self.counts)
        shuffled = self.order[np.lexsort((keys, segment))]
        picks = shuffled[self.starts[places][:, None] + np.arange(self.images_per_place)]
        seeds = rng.integers(0, 2**63 - 1, size=picks.shape, dtype=np.int64)
        for batch in range(len(self)):
            rows = slice(batch * self.places_per_batch, (batch + 1) * self.places_per_batch)
            yield list(zip(picks[rows].reshape(-1).tolist(), seeds[rows].reshape(-1).tolist(), strict=True))
