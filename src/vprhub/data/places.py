"""The common shape of every training set: images grouped by place."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ..image_io import UNREADABLE_IMAGE_ERRORS  # noqa: F401 (re-exported for the datasets)

logger = logging.getLogger(__name__)


def drop_small_places(labels: np.ndarray, min_images: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the images of places that have at least ``min_images`` images.

    Returns ``(kept, new_labels, dropped_places)``: indices of the kept images (in their
    original order), their labels renumbered ``0 .. P-1`` and the number of places dropped.
    """
    places, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    keep_place = counts >= min_images
    kept = np.flatnonzero(keep_place[inverse])
    _, new_labels = np.unique(inverse[kept], return_inverse=True)
    return kept, new_labels.astype(np.int64), int((~keep_place).sum())


class PlaceImages(torch.utils.data.Dataset):
    """Images grouped by place.

    Subclasses set ``labels`` (``[N]`` int64, places numbered ``0 .. P-1``) and implement
    ``load_image(index)``, which returns an RGB image opened with
    :func:`vprhub.image_io.open_image` or raises one of ``UNREADABLE_IMAGE_ERRORS``.  Item ``i`` is ``{"image": PIL.Image, "place_id": int}``.
    ``groups`` (``[N]`` int, optional) tells which images belong together beyond the place,
    e.g. the city.
    """

    name: str = "places"
    labels: np.ndarray
    groups: np.ndarray | None = None
    dropped_places: int = 0
    dropped_images: int = 0

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.load_image(index), "place_id": int(self.labels[index])}

    @property
    def num_places(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def _filter_places(self, labels: np.ndarray, min_images: int) -> np.ndarray:
        """Set ``labels`` from raw place keys, dropping (and reporting) small places; returns kept indices."""
        kept, self.labels, self.dropped_places = drop_small_places(labels, min_images)
        self.dropped_images = len(labels) - len(kept)
        if self.dropped_places:
            logger.warning(
                "%s: dropped %d places (%d images) with fewer than %d images",
                self.name,
                self.dropped_places,
                self.dropped_images,
                min_images,
            )
        if not len(kept):
            raise ValueError(f"{self.name}: no place has at least {min_images} images")
        return kept

    def __repr__(self) -> str:
        dropped = (
            f", dropped {self.dropped_places} places / {self.dropped_images} images" if self.dropped_places else ""
        )
        return f"{type(self).__name__}({self.name!r}: {len(self)} images of {self.num_places} places{dropped})"
