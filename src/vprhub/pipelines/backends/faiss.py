"""The embedded backend: a faiss ``IndexIDMap2`` plus a metadata dict, saved as files."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..compression import compression_factory, is_compression
from . import metadata_matches

FAISS_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
INDEX_TYPES = ("flat", "ivf", "pq", "ivfpq", "hnsw")
SIZED_TYPES = ("ivf", "pq", "ivfpq")  # their faiss structure is sized by the training set


def _num_lists(num_train: int) -> int:
    """IVF lists: about 4 sqrt(N), and at least 39 training points per list (faiss' rule)."""
    return int(np.clip(round(4 * math.sqrt(num_train)), 1, max(1, num_train // 39)))


def _pq_code(dim: int, num_train: int) -> str:
    """``PQ{M}x{nbits}np``: M the largest divisor of ``dim`` up to min(64, dim / 4), 2**nbits <= N <= 256.

    ``np`` skips faiss' polysemous training (a fixed ~1 min of annealing that only serves
    Hamming pre-filtering, which this index does not use).
    """
    sub = max(m for m in range(1, max(1, min(64, dim // 4)) + 1) if dim % m == 0)
    nbits = int(min(8, max(1, math.floor(math.log2(max(num_train, 2))))))
    return f"PQ{sub}x{nbits}np"


def is_binary(factory: str) -> bool:
    """Binary codes (``...,LSH``): searched by Hamming distance."""
    return "LSH" in factory.split(",")[-1]


def metric_of(factory: str) -> int:
    return faiss.METRIC_L2 if is_binary(factory) else faiss.METRIC_INNER_PRODUCT


def factory_string(index_type: str, dim: int, num_train: int) -> str:
    """The faiss ``index_factory`` string of a named index type for ``num_train`` vectors.

    ``index_type`` is one of :data:`INDEX_TYPES`, a compression option (``"pca256-fp16"``, see
    :mod:`vprhub.pipelines.compression`) or any faiss factory string (``"IVF1024,PQ64"``).
    """
    named = {
        "flat": lambda: "Flat",
        "ivf": lambda: f"IVF{_num_lists(num_train)},Flat",
        "pq": lambda: _pq_code(dim, num_train),
        "ivfpq": lambda: f"IVF{_num_lists(num_train)},{_pq_code(dim, num_train)}",
        "hnsw": lambda: "HNSW32",
    }
    if index_type in named:
        return named[index_type]()
    if is_compression(index_type):
        return compression_factory(index_type, dim, num_train)
    try:
        faiss.index_factory(dim, index_type, metric_of(index_type))
    except RuntimeError:
        raise ValueError(
            f"unknown index type {index_type!r}: use one of {INDEX_TYPES}, a compression option "
            "(fp16, pca256-fp16, pq64, binary512, ...) or a faiss index_factory string"
        ) from None
    return index_type


def _default_search_params(factory: str, num_lists: int | None) -> dict[str, int]:
    if num_lists is not None:
        return {"nprobe": min(num_lists, max(8, num_lists // 8))}
    if "HNSW" in factory:
        return {"efSearch": 128}
    return {}


def _innermost(index: faiss.Index) -> faiss.Index:
    while True:
        index = faiss.downcast_index(index)
        inner = getattr(index, "index", None)
        if inner is None or isinstance(index, faiss.IndexIVF):
            return index
        index = inner


def _drop_pca_training_state(index: faiss.Index) -> None:
    """A trained PCAMatrix applies only its ``A``/``b``; its full eigenvector matrix (D x D floats,
    285 MB at 8448-d) serves training alone, so it is dropped before the index is saved."""
    pre = faiss.downcast_index(faiss.downcast_index(index).index) if hasattr(index, "index") else index
    if isinstance(pre, faiss.IndexPreTransform):
        for k in range(pre.chain.size()):
            transform = faiss.downcast_VectorTransform(pre.chain.at(k))
            if isinstance(transform, faiss.PCAMatrix):
                transform.PCAMat.resize(0)


class FaissStore:
    """Vectors in a faiss index with external ids, metadata in a dict (kept in id order)."""

    kind = "faiss"

    def __init__(self, dim: int, index_type: str = "flat", search_params: Mapping[str, int] | None = None) -> None:
        self.dim = dim
        self.index_type = index_type
        self.search_params = dict(search_params or {})
        self.factory: str | None = None
        self.index: faiss.IndexIDMap2 | None = None
        self.rows: dict[int, dict] = {}
        if index_type not in SIZED_TYPES and not is_compression(index_type):
            self._create(factory_string(index_type, dim, 0))

    def _create(self, factory: str) -> None:
        self.index = faiss.index_factory(self.dim, f"IDMap2,{factory}", metric_of(factory))
        self.factory = factory
        ivf = faiss.try_extract_index_ivf(self.index)
        self.search_params = {**_default_search_params(factory, ivf.nlist if ivf is not None else None), **self.search_params}
        self.apply_search_params()

    def apply_search_params(self) -> None:
        space = faiss.ParameterSpace()
        for name, value in self.search_params.items():
            try:
                space.set_index_parameter(self.index, name, value)
            except RuntimeError:
                raise ValueError(f"search parameter {name!r} does not apply to a {self.factory} index") from None

    @property
    def is_trained(self) -> bool:
        return self.index is not None and self.index.is_trained

    def train(self, x: np.ndarray) -> None:
        if self.index is None:
            self._create(factory_string(self.index_type, self.dim, len(x)))
        self.index.train(x)
        _drop_pca_training_state(self.index)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))

    def upsert(self, ids: np.ndarray, x: np.ndarray, rows: list[dict]) -> None:
        present = [i for i in ids.tolist() if i in self.rows]
        if present:
            self.remove(np.asarray(present, dtype=np.int64))
        self.index.add_with_ids(x, ids)
        self.rows.update(zip(ids.tolist(), rows))

    def remove(self, ids: np.ndarray) -> None:
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            raise ValueError(
                f"a {self.factory} index cannot remove entries; rebuild it (or use flat, ivf, pq or ivfpq)"
            ) from None
        for i in ids.tolist():
            del self.rows[i]

    def metadata(self, ids: list[int]) -> list[dict]:
        try:
            return [dict(self.rows[i]) for i in ids]
        except KeyError as err:
            raise KeyError(f"no entry with id {err.args[0]}") from None

    def select(self, where: Mapping[str, Any]) -> np.ndarray:
        """Ids whose metadata matches ``where``."""
        return np.asarray([i for i, row in self.rows.items() if metadata_matches(row, where)], dtype=np.int64)

    def missing_keys(self, keys: set[str]) -> set[str]:
        """The ``keys`` that no entry's metadata has."""
        missing = set(keys)
        for row in self.rows.values():
            missing -= row.keys()
            if not missing:
                break
        return missing

    def coordinates(self, keys: tuple[str, str], where: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and ``[N, 2]`` numeric coordinates of the entries (matching ``where``) that have both keys."""
        found = [
            (i, (row[keys[0]], row[keys[1]]))
            for i, row in self.rows.items()
            if all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) for k in keys)
            and metadata_matches(row, where)
        ]
        ids = np.asarray([i for i, _ in found], dtype=np.int64)
        return ids, np.asarray([c for _, c in found], dtype=np.float64).reshape(-1, 2)

    def search(
        self, x: np.ndarray, k: int, where: Mapping[str, Any] | None = None, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if where:
            matching = self.select(where)
            allowed = matching if allowed is None else np.intersect1d(allowed, matching)
        params = None
        if allowed is not None:
            params = self._parameters(faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        scores, ids = self.index.search(x, int(k), params=params)
        if is_binary(self.factory):  # Hamming distance h over B bits -> 1 - 2h/B (a cosine estimate)
            bits = _innermost(self.index).nbits
            scores = 1 - 2 * scores / bits
        scores[ids < 0] = -np.inf
        return scores, ids

    def _parameters(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        inner = _innermost(self.index)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
        return faiss.SearchParameters(sel=selector)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (decoded: exact for flat, approximate for codes)."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.make_direct_map()
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), "f")

    # ------------------------------------------------------------------ files
    def write(self, folder: Path) -> None:
        target = folder / FAISS_FILE
        try:
            faiss.write_index(self.index, str(target))
        except RuntimeError as error:  # faiss reports a full disk or an unwritable folder this way
            code = _write_errno(error)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(target)) from error
        with open(folder / ENTRIES_FILE, "w", encoding="utf-8") as handle:
            for i, row in self.rows.items():
                handle.write(json.dumps({"id": i, "metadata": row}, allow_nan=False) + "\n")

    @classmethod
    def read(cls, folder: Path, dim: int, index_type: str, factory: str, search_params: dict) -> FaissStore:
        """Read the files of :meth:`write`; ids must agree between the faiss index and the entries."""
        store = cls.__new__(cls)
        store.dim, store.index_type, store.search_params, store.factory = dim, index_type, dict(search_params), factory
        try:
            stored = faiss.read_index(str(folder / FAISS_FILE))
        except RuntimeError as err:
            raise ValueError(f"damaged index {folder}: cannot read {FAISS_FILE} ({err})") from None
        if not isinstance(stored, faiss.IndexIDMap2) or stored.d != dim:
            raise ValueError(f"damaged index {folder}: {FAISS_FILE} is not a {dim}-d id-mapped index")
        store.index = stored
        store.apply_search_params()
        try:
            with open(folder / ENTRIES_FILE, encoding="utf-8") as handle:
                entries = [json.loads(line) for line in handle]
            store.rows = {int(e["id"]): e["metadata"] for e in entries}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"damaged index {folder}: cannot read {ENTRIES_FILE} ({err})") from None
        if len(store.rows) != len(entries):
            raise ValueError(f"damaged index {folder}: {ENTRIES_FILE} repeats ids")
        faiss_ids = np.sort(faiss.vector_to_array(stored.id_map))
        if not np.array_equal(faiss_ids, np.sort(store.ids())):
            raise ValueError(
                f"damaged index {folder}: the ids of {FAISS_FILE} ({len(faiss_ids)}) and {ENTRIES_FILE} "
                f"({len(store.rows)}) disagree"
            )
        return store


# Causes of a failed faiss write, as faiss spells them (the C library's strerror) at the end of its message.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.ENAMETOOLONG)


def _write_errno(error: RuntimeError) -> int | None:
    """The cause of a failed faiss write as an ``errno`` code, when its message names a known one."""
    return next((code for code in _WRITE_ERRNOS if os.strerror(code) in str(error)), None)
