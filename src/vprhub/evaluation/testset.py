"""The uniform test set every reader returns, and the radius search that finds positives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_POSITIVE_RADIUS = 25.0


@dataclass(frozen=True)
class VPRTestSet:
    """Database and query images of one benchmark, with the positives of every query.

    Args:
        name: name shown in tables and used as the JSON key.
        database_paths: database image files, in evaluation order.
        query_paths: query image files, in evaluation order.
        positives: per query, int64 indices into ``database_paths`` (may be empty).
        excluded_queries: queries the layout's own protocol drops before evaluation
            (MSLS keeps only queries with a positive); reported, never evaluated.
    """

    name: str
    database_paths: tuple[Path, ...]
    query_paths: tuple[Path, ...]
    positives: tuple[np.ndarray, ...]
    excluded_queries: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "database_paths", tuple(Path(p) for p in self.database_paths))
        object.__setattr__(self, "query_paths", tuple(Path(p) for p in self.query_paths))
        object.__setattr__(self, "positives", tuple(_as_indices(p, self.name, i) for i, p in enumerate(self.positives)))
        if not self.database_paths:
            raise ValueError(f"dataset {self.name!r} has no database images")
        if not self.query_paths:
            raise ValueError(f"dataset {self.name!r} has no query images")
        if len(self.positives) != len(self.query_paths):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.query_paths)} queries but positives for {len(self.positives)}"
            )
        for i, indices in enumerate(self.positives):
            if indices.size and (indices.min() < 0 or indices.max() >= len(self.database_paths)):
                raise ValueError(
                    f"dataset {self.name!r}: positives of query {i} ({self.query_paths[i]}) point outside "
                    f"the {len(self.database_paths)} database images: {indices.tolist()}"
                )

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def queries_without_positives(self) -> int:
        """Queries with no positive: they stay in the denominator and never count as found."""
        return sum(1 for p in self.positives if p.size == 0)

    def __repr__(self) -> str:
        return (
            f"VPRTestSet({self.name!r}, database={self.num_database}, queries={self.num_queries}, "
            f"queries_without_positives={self.queries_without_positives})"
        )


def _as_indices(value, name: str, query: int) -> np.ndarray:
    array = np.asarray(value)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"dataset {name!r}: positives of query {query} are not integers ({array.dtype})")
    return array.astype(np.int64).ravel()


def radius_positives(
    database_utm: np.ndarray,
    queries_utm: np.ndarray,
    radius: float = DEFAULT_POSITIVE_RADIUS,
    block: int = 256,
    max_pairs: int = 1 << 24,
) -> list[np.ndarray]:
    """Per query, the sorted indices of the database points within ``radius`` (inclusive), in float64.

    Same sets as scikit-learn's ``radius_neighbors`` used by the official readers. Both
    sides are sorted by easting so each block of queries is compared only with the database
    slice within ``radius`` in easting, ``max_pairs`` distances at a time.
    """
    database_utm = np.asarray(database_utm, dtype=np.float64)
    queries_utm = np.asarray(queries_utm, dtype=np.float64)
    for what, array in (("database", database_utm), ("query", queries_utm)):
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"{what} coordinates must be [N, 2] (easting, northing), got {list(array.shape)}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if len(queries_utm) == 0:
        return []
    db_order = np.argsort(database_utm[:, 0], kind="stable")
    db_sorted = database_utm[db_order]
    q_order = np.argsort(queries_utm[:, 0], kind="stable")
    found_queries, found_database = [], []
    for start in range(0, len(q_order), block):
        q_idx = q_order[start : start + block]
        q = queries_utm[q_idx]
        lo = np.searchsorted(db_sorted[:, 0], q[:, 0].min() - radius, side="left")
        hi = np.searchsorted(db_sorted[:, 0], q[:, 0].max() + radius, side="right")
        step = max(1, max_pairs // len(q_idx))
        for col in range(lo, hi, step):
            d = db_sorted[col : min(col + step, hi)]
            dist2 = (q[:, None, 0] - d[None, :, 0]) ** 2 + (q[:, None, 1] - d[None, :, 1]) ** 2
            rows, cols = np.nonzero(dist2 <= radius * radius)
            found_queries.append(q_idx[rows])
            found_database.append(db_order[col + cols])
    queries_found = np.concatenate(found_queries) if found_queries else np.empty(0, np.int64)
    database_found = np.concatenate(found_database) if found_database else np.empty(0, np.int64)
    order = np.lexsort((database_found, queries_found))
    counts = np.bincount(queries_found, minlength=len(queries_utm))
    return np.split(database_found[order].astype(np.int64), np.cumsum(counts)[:-1])


def check_images_exist(paths: Sequence[Path], source: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing image (and how many are missing)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed by {source} do not exist, e.g. {missing[0]}")
