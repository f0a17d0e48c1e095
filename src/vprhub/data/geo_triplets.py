"""Query/database training sets with UTM positions (MSLS, Pitts30k train), as SelaVPR trains on them.

Two layouts are read, with the evaluation readers' own parsing:

* the deep-visual-geo-localization layout, ``<folder>/{database,queries}/**/@east@north@...jpg``
  (what the official SelaVPR training reads, e.g. ``msls/images/train``);
* MSLS in its own layout, ``<root>/train_val/<city>/{database,query}`` with ``postprocessed.csv``
  (``MSLS_TRAIN_CITIES`` by default, panoramas dropped).

Hard positives are the database images within ``hard_radius`` (10 m) of a query; queries
without any are dropped (counted). Soft positives, within ``soft_radius`` (25 m), are never
taken as negatives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..evaluation.geo_folder import parse_utm, read_geo_folder
from ..evaluation.msls import _city_dir, _read_side
from ..evaluation.testset import check_images_exist, radius_positives
from ..image_io import open_image
from .places import PlaceImages

# The 22 MSLS training cities (the validation cities cph and sf are left out).
MSLS_TRAIN_CITIES = (
    "trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto", "saopaulo", "moscow",
    "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa", "phoenix", "goa", "amman", "nairobi",
    "manila",
)  # fmt: skip


@dataclass
class GeoTriplets:
    """Database and query images of a training set, with the positives that triplet mining uses.

    Attributes:
        name: for logs.
        database_paths, query_paths: image files; queries without a hard positive are left out.
        hard_positives: per query, database indices within ``hard_radius`` (candidates for the positive).
        soft_positives: per query, database indices within ``soft_radius`` (never negatives).
        dropped_queries: queries left out for lack of a hard positive.
    """

    name: str
    database_paths: list[Path]
    query_paths: list[Path]
    hard_positives: list[np.ndarray]
    soft_positives: list[np.ndarray]
    dropped_queries: int = 0

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @classmethod
    def from_utm(
        cls,
        name: str,
        database_paths: Sequence[Path],
        database_utm: np.ndarray,
        query_paths: Sequence[Path],
        query_utm: np.ndarray,
        hard_radius: float = 10.0,
        soft_radius: float = 25.0,
    ) -> GeoTriplets:
        """Positives from UTM coordinates; queries without a hard positive are dropped."""
        if hard_radius > soft_radius:
            raise ValueError(f"hard_radius ({hard_radius} m) must not exceed soft_radius ({soft_radius} m)")
        hard = radius_positives(database_utm, query_utm, hard_radius)
        soft = radius_positives(database_utm, query_utm, soft_radius)
        kept = [i for i, found in enumerate(hard) if found.size]
        if not kept:
            raise ValueError(f"{name}: no query has a database image within {hard_radius} m")
        return cls(
            name,
            list(database_paths),
            [Path(query_paths[i]) for i in kept],
            [hard[i] for i in kept],
            [soft[i] for i in kept],
            len(query_paths) - len(kept),
        )

    def __repr__(self) -> str:
        return (
            f"GeoTriplets({self.name!r}: {self.num_database} database images, {self.num_queries} queries"
            f"{f', {self.dropped_queries} without a positive dropped' if self.dropped_queries else ''})"
        )


def read_geo_triplets(
    folder: str | os.PathLike, hard_radius: float = 10.0, soft_radius: float = 25.0
) -> GeoTriplets:
    """A deep-visual-geo-localization folder (``database/`` + ``queries/``, @UTM file names)."""
    layout = read_geo_folder(folder, radius=soft_radius)
    database_utm = np.asarray([parse_utm(p) for p in layout.database_paths], dtype=np.float64)
    query_utm = np.asarray([parse_utm(p) for p in layout.query_paths], dtype=np.float64)
    return GeoTriplets.from_utm(
        layout.name, layout.database_paths, database_utm, layout.query_paths, query_utm, hard_radius, soft_radius
    )


def read_msls_triplets(
    root: str | os.PathLike,
    cities: Sequence[str] | None = None,
    hard_radius: float = 10.0,
    soft_radius: float = 25.0,
) -> GeoTriplets:
    """MSLS in its own layout (the folder holding ``train_val/``); positives never cross cities.

    ``cities`` defaults to the ``MSLS_TRAIN_CITIES`` present under ``train_val/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MSLS root {root} does not exist")
    if cities is None:
        cities = [city for city in MSLS_TRAIN_CITIES if (root / "train_val" / city).is_dir()]
        if not cities:
            raise FileNotFoundError(
                f"{root / 'train_val'} holds none of the MSLS training cities ({', '.join(MSLS_TRAIN_CITIES)})"
            )
    database_paths, query_paths, hard, soft, dropped = [], [], [], [], 0
    for city in cities:
        city_dir = _city_dir(root, city)
        city_database, database_utm = _read_side(city_dir / "database", "all", exclude_panoramas=True)
        city_queries, query_utm = _read_side(city_dir / "query", "all", exclude_panoramas=True)
        try:
            part = GeoTriplets.from_utm(
                city, city_database, database_utm, city_queries, query_utm, hard_radius, soft_radius
            )
        except ValueError:  # a city without any usable query
            dropped += len(city_queries)
            database_paths.extend(city_database)
            continue
        offset = len(database_paths)
        database_paths.extend(part.database_paths)
        query_paths.extend(part.query_paths)
        hard.extend(found + offset for found in part.hard_positives)
        soft.extend(found + offset for found in part.soft_positives)
        dropped += part.dropped_queries
    if not query_paths:
        raise ValueError(f"MSLS under {root}: no query has a database image within {hard_radius} m")
    check_images_exist(database_paths + query_paths, f"the MSLS metadata under {root}")
    return GeoTriplets(f"msls({root.name})", database_paths, query_paths, hard, soft, dropped)


def load_geo_triplets(source: str | os.PathLike, hard_radius: float = 10.0, soft_radius: float = 25.0) -> GeoTriplets:
    """An MSLS root (``train_val/``) or a deep-visual-geo-localization folder."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"training data {source} not found")
    if (path / "train_val").is_dir():
        return read_msls_triplets(path, hard_radius=hard_radius, soft_radius=soft_radius)
    return read_geo_triplets(path, hard_radius, soft_radius)


class GeoImages(PlaceImages):
    """The images of a ``GeoTriplets`` as one indexable set: database first, then queries (the
    official global numbering). Each image is its own "place": ``labels`` are the indices."""

    def __init__(self, triplets: GeoTriplets):
        self.triplets = triplets
        self.name = triplets.name
        self.paths = [*triplets.database_paths, *triplets.query_paths]
        self.labels = np.arange(len(self.paths), dtype=np.int64)

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.paths[index])
