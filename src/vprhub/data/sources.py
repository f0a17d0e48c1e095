"""Turn a ``--train_dataset`` string into a ``PlaceImages``."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils import opening_source
from .gsv_cities import GSVCities, is_gsv_cities
from .hf import load_hf_places
from .places import PlaceImages
from .synthetic import SyntheticPlaces


def load_places(
    source: str | os.PathLike,
    min_images_per_place: int = 4,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    synthetic_places: int = 200,
    synthetic_views: int = 4,
    image_size: int | tuple[int, int] = 224,
    seed: int = 0,
    synthetic_difficulty: float = 1.0,
) -> PlaceImages:
    """Open training places from ``source``:

    * ``"synthetic"``: ``SyntheticPlaces(synthetic_places, synthetic_views, image_size, seed,
      difficulty=synthetic_difficulty)``;
    * a GSV-Cities folder (``Dataframes/*.csv``): ``GSVCities``;
    * a ``save_to_disk`` folder, an image folder (one sub-folder per place) or a Hub dataset
      id: ``HFPlaces`` over ``split``.

    Places with fewer than ``min_images_per_place`` images are dropped and counted.
    """
    if str(source) == "synthetic":
        return SyntheticPlaces(synthetic_places, synthetic_views, image_size, seed, difficulty=synthetic_difficulty)
    with opening_source(source, "training data") as resolved:
        path = Path(resolved)
        if path.is_dir() and is_gsv_cities(path):
            return GSVCities(path, min_images_per_place=min_images_per_place)
        return load_hf_places(resolved, split, image_column, label_column, min_images_per_place)
