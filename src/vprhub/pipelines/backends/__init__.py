"""Storage backends of :class:`~vprhub.pipelines.index.PlaceIndex`: where the vectors and their
metadata live and how they are searched.

* :class:`FaissStore` (``faiss``): in process, saved as files inside the index folder;
* :class:`MilvusStore` (``milvus``): a Milvus collection, either a local milvus-lite file
  (``map.db``) or a server / cluster (``http://host:19530``); every write goes straight to it.

Both answer the same calls (``upsert``, ``remove``, ``metadata``, ``ids``, ``search`` with an
optional metadata filter and an optional set of allowed ids, ``coordinates``) and return the
same ids and scores for exact (flat) search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

BACKENDS = ("faiss", "milvus")


def metadata_matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """``where`` holds ``key: value`` (equality) or ``key: [values]`` (any of them)."""
    for key, wanted in where.items():
        value = row.get(key)
        if isinstance(wanted, (list, tuple, set)):
            if not any(_same(value, w) for w in wanted):
                return False
        elif not _same(value, wanted):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps types apart ("02134" != 2134, True != 1), as a JSON filter does."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return a == b


def check_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a metadata filter: string keys, JSON scalars or lists of them."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise ValueError(f"a metadata filter must be a mapping of key -> value(s), got {type(where).__name__}")
    for key, value in where.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata filter keys must be non-empty strings, got {key!r}")
        values = value if isinstance(value, (list, tuple, set)) else [value]
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise ValueError(f"metadata filter {key!r}: values must be strings, numbers or booleans, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"metadata filter {key!r}: {v} matches nothing (metadata holds no NaN / inf)")
    return dict(where)


from .faiss import FaissStore  # noqa: E402
from .milvus import MilvusStore  # noqa: E402

__all__ = ["BACKENDS", "FaissStore", "MilvusStore", "check_where", "metadata_matches"]
