"""Reader for Mapillary Street-Level Sequences in its own layout (image-to-image task).

``<root>/train_val/<city>/{query,database}/`` with ``images/<key>.jpg``, ``postprocessed.csv``
(``key``, ``easting``, ``northing``, ...), ``raw.csv`` (``key``, ..., ``pano``) and
``subtask_index.csv`` (one boolean column per subtask: ``all``, ``s2w``, ``n2d``, ...).
As in the official validation reader: panoramas are dropped, the ``subtask`` column
selects the images, positives are database images of the same city within 25 m (UTM),
and only queries with at least one positive are evaluated (the others are counted).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .testset import DEFAULT_POSITIVE_RADIUS, VPRTestSet, check_images_exist, radius_positives

MSLS_VAL_CITIES = ("cph", "sf")
_TRUE, _FALSE = {"true", "1", "1.0"}, {"false", "0", "0.0"}


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"MSLS metadata file {path} does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns found: {reader.fieldnames}")
        return list(reader)


def _column(rows: list[dict[str, str]], column: str, path: Path, kind: type) -> np.ndarray:
    values = []
    for line, row in enumerate(rows, start=2):
        text = (row[column] or "").strip()
        try:
            if kind is bool:
                if text.lower() not in _TRUE | _FALSE:
                    raise ValueError
                values.append(text.lower() in _TRUE)
            else:
                values.append(float(text))
        except ValueError:
            raise ValueError(f"{path}, line {line}: column {column!r} has invalid value {text!r}") from None
    return np.asarray(values, dtype=kind if kind is bool else np.float64)


def _read_side(side_dir: Path, subtask: str, exclude_panoramas: bool) -> tuple[list[Path], np.ndarray]:
    """Image paths and UTM coordinates of one ``query`` or ``database`` folder after filtering."""
    post_path = side_dir / "postprocessed.csv"
    post = _read_csv(post_path, ("key", "easting", "northing"))
    if not post:
        raise ValueError(f"{post_path} has no rows")
    keys = [row["key"] for row in post]
    utm = np.stack([_column(post, "easting", post_path, float), _column(post, "northing", post_path, float)], 1)
    keep = np.ones(len(post), dtype=bool)
    filters = [("subtask_index.csv", subtask, False)]
    if exclude_panoramas:
        filters.append(("raw.csv", "pano", True))
    for file_name, column, drop_when_true in filters:
        path = side_dir / file_name
        rows = _read_csv(path, (column,))
        if len(rows) != len(post):
            raise ValueError(f"{path} has {len(rows)} rows but {post_path} has {len(post)}")
        if "key" in rows[0] and [row["key"] for row in rows] != keys:
            raise ValueError(f"{path}: the 'key' column is not in the order of {post_path}")
        flags = _column(rows, column, path, bool)
        keep &= ~flags if drop_when_true else flags
    paths = [side_dir / "images" / f"{key}.jpg" for key, kept in zip(keys, keep) if kept]
    return paths, utm[keep]


def _city_dir(root: Path, city: str) -> Path:
    for split in ("train_val", "test"):
        if (root / split / city).is_dir():
            return root / split / city
    raise FileNotFoundError(f"MSLS city folder {root / 'train_val' / city} does not exist")


def read_msls(
    root: str | os.PathLike,
    cities: Sequence[str] = MSLS_VAL_CITIES,
    name: str = "msls_val",
    radius: float = DEFAULT_POSITIVE_RADIUS,
    subtask: str = "all",
    exclude_panoramas: bool = True,
) -> VPRTestSet:
    """Read the MSLS cities under ``root`` (the folder holding ``train_val/``) as one test set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MSLS root {root} does not exist")
    database_paths, query_paths, positives, excluded = [], [], [], 0
    for city in cities:
        city_dir = _city_dir(root, city)
        city_db, db_utm = _read_side(city_dir / "database", subtask, exclude_panoramas)
        city_queries, query_utm = _read_side(city_dir / "query", subtask, exclude_panoramas)
        for query, found in zip(city_queries, radius_positives(db_utm, query_utm, radius)):
            if found.size:
                query_paths.append(query)
                positives.append(found + len(database_paths))
            else:
                excluded += 1
        database_paths.extend(city_db)
    check_images_exist(database_paths + query_paths, f"the MSLS metadata under {root}")
    return VPRTestSet(name, database_paths, query_paths, positives, excluded_queries=excluded)
