"""PlaceIndex: place descriptors with stable ids and metadata, behind one API on two backends.

* ``faiss`` (default, embedded): one folder (``map.vprindex/``), written atomically:

  * ``vprindex.json``: format, dimension, index type, search parameters, the model identity
    (name, config hash, preprocessing, probe descriptors), the build report, and the size and
    SHA-256 of every other file (a truncated or corrupted file is caught on load);
  * ``index.faiss``: the faiss index (``IndexIDMap2`` around the chosen structure, with any
    compression transform inside it, so queries go through it automatically);
  * ``entries.jsonl``: one ``{"id": ..., "metadata": {...}}`` line per entry, standard JSON;
  * ``local_features.npy`` + ``local_ids.npy`` (optional): float16 dense local features for
    SelaVPR re-ranking (see :mod:`vprhub.pipelines.local_store` for the memory policy).

* ``milvus``: a Milvus collection, in a milvus-lite file (``map.db``) or on a server
  (``http://host:19530``); see :mod:`vprhub.pipelines.backends.milvus`.

:meth:`PlaceIndex.load` opens either (a folder, or a Milvus URI).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import FolderKind, atomic_write_dir, recover_dir, sha256_file
from .backends import BACKENDS, FaissStore, MilvusStore, check_where
from .backends.faiss import INDEX_TYPES, factory_string
from .backends.milvus import DEFAULT_COLLECTION, is_milvus_uri
from .local_store import FEATURES_FILE, IDS_FILE, LOCAL_STORAGES, LocalFeatureStore

__all__ = ["INDEX_TYPES", "PlaceIndex", "factory_string"]

FORMAT = "vprhub-place-index"
FORMAT_VERSION = 2  # 2: files carry a SHA-256
MANIFEST_FILE = "vprindex.json"
# Probe descriptors of one model agree to cosine 1 - 1e-5 across float32 / float16 / bfloat16
# (measured on a ViT-L SelaVPR);
# another model (or other weights) disagrees far more.
PROBE_MIN_COSINE = 0.999
EARTH_RADIUS_M = 6_371_008.8
LATLON_KEYS = ("lat", "lon")


def _is_place_index(folder: Path) -> bool:
    """A valid manifest, and nothing in ``folder`` but the files it lists (what vprhub wrote)."""
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError):
        return False
    return {p.name for p in folder.iterdir()} <= {MANIFEST_FILE, *manifest["files"]}


PLACE_INDEX = FolderKind(f"a vprhub place index ({MANIFEST_FILE})", _is_place_index)


def _as_matrix(descriptors: Any, dim: int, what: str) -> np.ndarray:
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape [N, {dim}] (or [{dim}]), got {list(np.shape(descriptors))}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(x)


def _check_json(value: Any, where: str) -> None:
    """Standard JSON only: string keys (an int key would come back as a string), no NaN / inf."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings (JSON turns {key!r} into {str(key)!r}), got {key!r}")
            _check_json(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}: not valid JSON; use None (null) for a missing value")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{where} is not JSON-serialisable: {type(value).__name__} {value!r}")


def _check_metadata(metadata: Sequence[Mapping] | None, n: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(n)]
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"got {len(metadata)} metadata rows for {n} descriptors")
    for i, row in enumerate(metadata):
        if not isinstance(row, Mapping):
            raise ValueError(f"metadata row {i} must be a mapping, got {type(row).__name__}")
        _check_json(row, f"metadata row {i}")
    return [dict(row) for row in metadata]


def distances_m(coordinates: np.ndarray, near: tuple[float, float], keys: tuple[str, str]) -> np.ndarray:
    """Metres from ``near``: great-circle for ``lat``/``lon`` keys, planar (UTM metres) otherwise."""
    if tuple(keys) == LATLON_KEYS:
        lat1, lon1 = np.radians(coordinates[:, 0]), np.radians(coordinates[:, 1])
        lat0, lon0 = np.radians(near[0]), np.radians(near[1])
        a = np.sin((lat1 - lat0) / 2) ** 2 + np.cos(lat0) * np.cos(lat1) * np.sin((lon1 - lon0) / 2) ** 2
        return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0, 1)))
    return np.hypot(coordinates[:, 0] - near[0], coordinates[:, 1] - near[1])


class PlaceIndex:
    """Global descriptors (inner product = cosine for L2-normalised descriptors) with stable ids.

    Args:
        dim: descriptor width D.
        index_type: ``"flat"`` (exact, default), ``"ivf"``, ``"pq"``, ``"ivfpq"``, ``"hnsw"``,
            or any faiss factory string (compressed forms: see :mod:`vprhub.pipelines.compression`).
            All but flat and hnsw are trained on the first descriptors added (or on
            :meth:`train`). The PQ code size (64 bytes by default) bounds the recall: on 20k
            random clustered 8448-d descriptors ``IVF128,PQ64x8np`` found the exact nearest
            neighbour in its top 10 for 60% of queries, ``IVF128,PQ264x8np`` for 100%
            (``benchmarks/index_search.py``).
        identity: what produced the descriptors (see ``PlaceRecognitionPipeline.identity``);
            queries from another model are refused.
        search_params: faiss search-time parameters, e.g. ``{"nprobe": 32}`` or ``{"efSearch": 128}``.
        backend: ``"faiss"`` (in process, saved as a folder) or ``"milvus"`` (exact search in a
            Milvus collection at ``uri``; writes go straight to it).
        uri: the Milvus URI (``map.db`` for milvus-lite, ``http://host:19530`` for a server).
        collection: the Milvus collection name.
        local_storage: how SelaVPR local features added later are kept: ``"float16"`` or
            ``"int8"`` maps, or ``"recompute"`` (none kept; re-ranking re-embeds the candidates
            from their metadata ``path``); see :mod:`vprhub.pipelines.local_store`.

    Every entry gets an id that never changes (``add`` returns them; ``remove`` leaves the
    others alone) and a JSON metadata dict (path, coordinates, ...). An existing Milvus
    collection is reopened (a resumed build continues it) if it holds the same dimension and
    model; otherwise it is refused before anything is written.
    """

    def __init__(
        self,
        dim: int,
        index_type: str = "flat",
        identity: Mapping[str, Any] | None = None,
        search_params: Mapping[str, int] | None = None,
        backend: str = "faiss",
        uri: str | os.PathLike | None = None,
        collection: str = DEFAULT_COLLECTION,
        local_storage: str = "float16",
    ) -> None:
        if local_storage not in LOCAL_STORAGES:
            raise ValueError(f"unknown local_storage {local_storage!r}: use one of {LOCAL_STORAGES}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.dim = int(dim)
        self.identity = dict(identity) if identity is not None else None
        self.local_features: LocalFeatureStore | None = None
        self._local_storage = local_storage
        self.build_report: dict[str, Any] | None = None
        self._next_id = 0
        if backend == "faiss":
            if uri is not None:
                raise ValueError("uri is for the milvus backend; a faiss index is saved with save(folder)")
            self._store: FaissStore | MilvusStore = FaissStore(self.dim, index_type, search_params)
        else:
            if uri is None:
                raise ValueError("the milvus backend needs uri= (a milvus-lite file such as map.db, or http://host:19530)")
            if index_type != "flat" or search_params:
                raise ValueError(f"the milvus backend searches exactly (FLAT); index_type {index_type!r} is faiss-only")
            self._store = MilvusStore(uri, collection)
            if self._store.exists():
                self._adopt(self._store.manifest(), check_dim=True)
            else:
                self._store.create(self.dim, self._manifest())

    # ------------------------------------------------------------------ structure
    @property
    def backend(self) -> str:
        return self._store.kind

    @property
    def local_storage(self) -> str | None:
        """``"float16"``, ``"int8"`` (stored maps), ``"recompute"``, or None (no re-ranking)."""
        if self._local_storage == "recompute":
            return "recompute"
        return self.local_features.storage if self.local_features is not None else None

    @property
    def index_type(self) -> str:
        return self._store.index_type

    @property
    def factory(self) -> str | None:
        return self._store.factory

    @property
    def search_params(self) -> dict[str, int]:
        return self._store.search_params

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW)."""
        if self.backend != "faiss":
            raise ValueError("search parameters apply to approximate faiss indices only")
        self._store.search_params.update(params)
        if self._store.index is not None:
            self._store.apply_search_params()

    @property
    def is_trained(self) -> bool:
        return self._store.is_trained

    def train(self, descriptors: Any) -> None:
        """Train the IVF / PQ / compression structure on representative descriptors (the database or a sample)."""
        x = _as_matrix(descriptors, self.dim, "training descriptors")
        if self.is_trained:
            raise ValueError("the index is already trained")
        if len(x) < 2:
            raise ValueError(f"a {self.index_type} index needs at least 2 descriptors to train, got {len(x)}")
        self._store.train(x)

    # ------------------------------------------------------------------ entries
    def __len__(self) -> int:
        return len(self._store)

    @property
    def next_id(self) -> int:
        """The id the next added entry gets."""
        return self._next_id

    @property
    def ids(self) -> np.ndarray:
        """Ids of the entries, increasing."""
        return np.sort(self._store.ids())

    def add(
        self,
        descriptors: Any,
        metadata: Sequence[Mapping] | None = None,
        local_features: Any = None,
    ) -> np.ndarray:
        """Add ``[N, D]`` descriptors (trains the index first if needed); returns their ids.

        ``local_features`` (``[N, h, w, C]``) are required once the index keeps them, and
        accepted on the first ``add`` of an empty index to start keeping them (faiss backend).
        """
        x = _as_matrix(descriptors, self.dim, "descriptors")
        rows = _check_metadata(metadata, len(x))
        if local_features is not None:
            if self.backend != "faiss":
                raise ValueError("the milvus backend keeps no local features: re-ranking needs the faiss backend")
            if self._local_storage == "recompute":
                raise ValueError("this index recomputes local features at re-ranking time: add no maps")
            local_features = np.asarray(local_features)
            if len(local_features) != len(x):
                raise ValueError(f"got {len(local_features)} local feature maps for {len(x)} descriptors")
            if self.local_features is None:
                if len(self):
                    raise ValueError("this index keeps no local features; they can only start with an empty index")
                self.local_features = LocalFeatureStore(local_features.shape[1:], self._local_storage)
        elif self.local_features is not None and len(x):
            raise ValueError("this index keeps local features for re-ranking: pass local_features too")
        if not self.is_trained:
            self.train(x)
        ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        if self.local_features is not None:
            self.local_features.add(ids, local_features)
        self._store.upsert(ids, x, rows)
        self._next_id += len(x)
        if self.backend == "milvus":
            self._store.write_manifest(self._manifest())
        return ids

    def add_index(self, other: PlaceIndex) -> np.ndarray:
        """Add every entry of ``other`` (same model and width; e.g. a faiss map into Milvus); new ids."""
        if other.dim != self.dim:
            raise ValueError(f"dimension mismatch: this index holds {self.dim}-d descriptors, the other {other.dim}-d")
        if other.identity is not None and self.identity is not None:
            self.check_compatible(other.identity)
        ids = other.ids
        local = other.local_features.get(ids) if other.local_features is not None else None
        return self.add(other._store.reconstruct(ids), other.metadata(ids), local)

    def remove(self, ids: Iterable[int]) -> None:
        """Remove entries by id; the other ids stay valid."""
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        self.metadata(ids.tolist())  # KeyError naming an unknown id
        self._store.remove(ids)
        if self.local_features is not None:
            self.local_features.remove(ids)

    def metadata(self, ids: Iterable[int]) -> list[dict]:
        """Metadata dicts of ``ids`` (copies), in order."""
        return self._store.metadata([int(i) for i in ids])

    def descriptors(self, ids: Iterable[int]) -> np.ndarray:
        """Stored descriptors of ``ids`` ``[N, D]`` float32, in order (decoded: exact for flat, approximate for PQ)."""
        ids = [int(i) for i in ids]
        self.metadata(ids)  # KeyError naming an unknown id
        return self._store.reconstruct(np.asarray(ids, dtype=np.int64))

    def search(
        self,
        descriptors: Any,
        top_k: int = 5,
        where: Mapping[str, Any] | None = None,
        near: tuple[float, float] | None = None,
        radius_m: float | None = None,
        coordinate_keys: tuple[str, str] = LATLON_KEYS,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``top_k`` entries per query: ``(scores [Q, k] float32, ids [Q, k] int64)``.

        Scores are inner products (cosines for unit descriptors), best first. ``where`` keeps
        entries whose metadata equals the given values (``{"city": "Oslo", "zip": ["02134",
        "02135"]}``, type-strict); ``near`` + ``radius_m`` keep entries within ``radius_m``
        metres of ``near``, read from the ``coordinate_keys`` metadata (``lat``/``lon`` degrees:
        great-circle distance; other keys, e.g. ``utm_east``/``utm_north``: planar metres).
        A ``top_k`` above the number of entries is clamped to it (``k = min(top_k, len(self))``).
        Filters and approximate indices may leave fewer than ``k`` entries; the missing slots
        hold id -1 and score -inf. A filter key that no entry's metadata has is an error.
        """
        x = _as_matrix(descriptors, self.dim, "query descriptors")
        if not len(self):
            raise ValueError("the index is empty: add descriptors before searching")
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        where = check_where(where)
        allowed = None
        if (near is None) != (radius_m is None):
            raise ValueError("near and radius_m go together")
        if near is not None:
            near = tuple(float(v) for v in near)
            if len(near) != 2 or not all(map(math.isfinite, near)):
                raise ValueError(f"near must be two finite coordinates, got {near}")
            if tuple(coordinate_keys) == LATLON_KEYS and not (-90 <= near[0] <= 90 and -180 <= near[1] <= 180):
                raise ValueError(f"near={near} is not a latitude, longitude pair")
            if not (isinstance(radius_m, (int, float)) and radius_m > 0 and math.isfinite(radius_m)):
                raise ValueError(f"radius_m must be a positive number of metres, got {radius_m!r}")
            ids, coordinates = self._store.coordinates(tuple(coordinate_keys), where)
            allowed = ids[distances_m(coordinates, near, tuple(coordinate_keys)) <= radius_m]
        scores, ids = self._store.search(x, min(int(top_k), len(self)), where or None, allowed)
        if (ids < 0).all() and (where or near is not None):
            self._check_filter_keys(set(where) | (set(coordinate_keys) if near is not None else set()))
            self._check_filter_types(x[:1], where, allowed)
        return scores, ids

    def _check_filter_keys(self, keys: set[str]) -> None:
        """Refuse a filter on metadata that no entry has (it would silently match nothing)."""
        missing = self._store.missing_keys(keys)
        if missing:
            raise ValueError(f"no entry of the index has the metadata key {sorted(missing)}: the filter matches nothing")

    def _check_filter_types(self, x: np.ndarray, where: Mapping[str, Any], allowed: np.ndarray | None) -> None:
        """Refuse a number in a filter that matches nothing when its text would (CSV metadata is text)."""
        as_text = {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in where.items()}
        if as_text != dict(where) and (self._store.search(x, 1, as_text, allowed)[1] >= 0).any():
            numbers = {k: v for k, v in where.items() if as_text[k] != v}
            raise ValueError(
                f"the filter {numbers} matches nothing: the entries hold these values as text, {as_text}"
                " would match (on the command line, quote the value as JSON: --where 'KEY=\"VALUE\"')"
            )

    # ------------------------------------------------------------------ model identity
    def check_compatible(self, identity: Mapping[str, Any]) -> None:
        """Refuse (``ValueError``) a query model whose descriptors are not comparable with the index's."""
        dim = identity.get("descriptor_dim")
        if dim is not None and dim != self.dim:
            raise ValueError(
                f"descriptor dimension mismatch: the index holds {self.dim}-d descriptors, "
                f"the query model {identity.get('name_or_path')!r} gives {dim}-d"
            )
        if self.identity is None:
            return
        mine = self.identity
        names = f"index built with {mine.get('name_or_path')!r}, query model {identity.get('name_or_path')!r}"
        for key, what in (("model_type", "model type"), ("config_hash", "model configuration")):
            if mine.get(key) != identity.get(key):
                raise ValueError(
                    f"model mismatch ({names}): {what} differs ({mine.get(key)} vs {identity.get(key)}); "
                    "rebuild the index with the query model"
                )
        if mine.get("image_processor") != identity.get("image_processor"):
            a, b = mine.get("image_processor") or {}, identity.get("image_processor") or {}
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise ValueError(f"preprocessing mismatch ({names}): image processor differs in {keys}")
        if mine.get("probe") is not None and identity.get("probe") is not None:
            a, b = np.asarray(mine["probe"], np.float64), np.asarray(identity["probe"], np.float64)
            cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
            if cosine.min() < PROBE_MIN_COSINE:
                raise ValueError(
                    f"model mismatch ({names}): same configuration but different weights "
                    f"(probe descriptors agree only to cosine {cosine.min():.4f}); rebuild the index"
                )

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "dim": self.dim,
            "metric": "inner_product",
            "index_type": self.index_type,
            "factory": self.factory,
            "search_params": self.search_params,
            "num_entries": len(self) if self.backend == "faiss" else None,  # Milvus counts its own
            "next_id": self._next_id,
            "identity": self.identity,
            "build_report": self.build_report,
            "local_features": self.local_storage,
        }

    def _adopt(self, manifest: dict | None, check_dim: bool = False) -> None:
        """Take identity, next id and report from an existing Milvus collection's manifest."""
        store = self._store
        where = f"Milvus collection {store.collection!r} at {store.uri}"
        if manifest is None or manifest.get("format") != FORMAT:
            raise ValueError(f"{where} is not a vprhub place index")
        if check_dim and store.dim != self.dim:
            raise ValueError(f"descriptor dimension mismatch: {where} holds {store.dim}-d descriptors, not {self.dim}-d")
        if check_dim and self.identity is not None:
            stored = PlaceIndex(self.dim, identity=manifest.get("identity"))
            stored.check_compatible(self.identity)  # refuse another model before writing anything
        self.identity = manifest.get("identity")
        self.build_report = manifest.get("build_report")
        beyond = store.ids_from(int(manifest["next_id"]))  # written by a build killed before its manifest update
        self._next_id = max(int(manifest["next_id"]), int(beyond.max()) + 1 if len(beyond) else 0)

    def save(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> None:
        """Write the index folder atomically (a failure leaves any previous index untouched).

        A Milvus index is written as it changes; ``save()`` only records its build report.
        """
        if self.backend == "milvus":
            if path is not None and str(path) != self._store.uri:
                raise ValueError(f"a milvus index lives at {self._store.uri}; copy it with add_index into a new one")
            self._store.write_manifest(self._manifest())
            return
        if path is None:
            raise ValueError("save() of a faiss index needs a folder")
        if self._store.index is None:
            raise ValueError("the index was never trained or filled: nothing to save")
        with atomic_write_dir(path, overwrite=overwrite, kind=PLACE_INDEX) as tmp:
            self._store.write(tmp)
            if self.local_features is not None:
                self.local_features.save(tmp)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
            manifest = self._manifest() | {"files": files}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=False), encoding="utf-8")

    @classmethod
    def open(cls, uri: str | os.PathLike, collection: str = DEFAULT_COLLECTION) -> PlaceIndex:
        """Reopen a Milvus-backed index (after a restart, or from another process)."""
        store = MilvusStore(uri, collection)
        if not store.exists():
            raise ValueError(f"no collection {collection!r} at Milvus {uri}: build the index first")
        index = cls.__new__(cls)
        index.dim, index.local_features, index._store = store.dim, None, store
        index._local_storage = "float16"
        index._adopt(store.manifest())
        return index

    @classmethod
    def load(cls, path: str | os.PathLike, collection: str = DEFAULT_COLLECTION) -> PlaceIndex:
        """Open an index folder written by :meth:`save`, or a Milvus URI (see :meth:`open`).

        Sizes, SHA-256 checksums and the agreement of ids between the faiss index, the
        entries and the local features are checked; a damaged folder raises ``ValueError``.
        """
        if is_milvus_uri(path):
            return cls.open(path, collection)
        folder = Path(path)
        recover_dir(folder)
        manifest = _read_manifest(folder)
        for name, recorded in manifest["files"].items():
            file = folder / name
            size, digest = (recorded, None) if isinstance(recorded, int) else (recorded["bytes"], recorded["sha256"])
            if not file.is_file():
                raise ValueError(f"damaged index {folder}: {name} is missing")
            if file.stat().st_size != size:
                raise ValueError(f"damaged index {folder}: {name} has {file.stat().st_size} bytes, expected {size}")
            if digest is not None and sha256_file(file) != digest:
                raise ValueError(f"damaged index {folder}: {name} does not match its checksum (corrupted)")
        index = cls.__new__(cls)
        index.dim, index.identity = int(manifest["dim"]), manifest["identity"]
        index._store = FaissStore.read(
            folder, index.dim, manifest["index_type"], manifest["factory"], manifest["search_params"]
        )
        index.local_features = None
        index._local_storage = "recompute" if manifest.get("local_features") == "recompute" else "float16"
        if FEATURES_FILE in manifest["files"] and IDS_FILE in manifest["files"]:
            index.local_features = LocalFeatureStore.load(folder)
            if not np.array_equal(np.sort(index.local_features._ids), index.ids):
                raise ValueError(f"damaged index {folder}: the ids of the local features and of the entries disagree")
        if len(index) != manifest["num_entries"]:
            raise ValueError(f"damaged index {folder}: {len(index)} entries, the manifest says {manifest['num_entries']}")
        ids = index.ids
        # a lowered next_id must never hand out an id again
        index._next_id = max(int(manifest["next_id"]), int(ids[-1]) + 1 if len(ids) else 0)
        index.build_report = manifest["build_report"]
        return index

    def close(self) -> None:
        """Release a Milvus connection (a milvus-lite file can then be opened by another process)."""
        if self.backend == "milvus":
            self._store.close()

    def __repr__(self) -> str:
        model = (self.identity or {}).get("name_or_path")
        return (
            f"PlaceIndex(backend={self.backend!r}, entries={len(self)}, dim={self.dim}, "
            f"type={self.factory or self.index_type!r}, model={model!r}, local_features={self.local_features is not None})"
        )


def _count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _optional(kind: type, value: Any) -> bool:
    return value is None or isinstance(value, kind)


def _file_record(record: Any) -> bool:
    """A file's size (format 1) or ``{"bytes": size, "sha256": hex digest}`` (format 2)."""
    if isinstance(record, dict):
        digest = record.get("sha256")
        return _count(record.get("bytes")) and isinstance(digest, str) and len(digest) == 64
    return _count(record)


def _files(files: Any) -> bool:
    return isinstance(files, dict) and all(
        name not in ("", ".", "..", MANIFEST_FILE) and Path(name).name == name and _file_record(record)
        for name, record in files.items()
    )


def _probe(probe: Any) -> bool:
    try:
        return probe is None or np.asarray(probe, np.float64).ndim == 2
    except (TypeError, ValueError):
        return False


def _identity(identity: Any) -> bool:
    return identity is None or (
        isinstance(identity, dict)
        and _optional(str, identity.get("name_or_path"))
        and _optional(str, identity.get("revision"))
        and (identity.get("descriptor_dim") is None or _count(identity["descriptor_dim"], 1))
        and _optional(dict, identity.get("image_processor"))
        and _probe(identity.get("probe"))
    )


def _build_report(report: Any) -> bool:
    return report is None or (
        isinstance(report, dict)
        and (report.get("batch_size") is None or _count(report["batch_size"], 1))
        and _optional(str, report.get("image_root"))
        and _optional(list, report.get("skipped"))
    )


# field: (what it must be, check); every field is required but local_features (older indexes lack it)
_MANIFEST_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "dim": ("a positive integer", lambda v: _count(v, 1)),
    "index_type": ("a string", lambda v: isinstance(v, str)),
    "factory": ("a string or null", lambda v: _optional(str, v)),
    "search_params": (
        "an object of positive integers",
        lambda v: isinstance(v, dict) and all(_count(x, 1) for x in v.values()),
    ),
    "num_entries": ("a non-negative integer", _count),
    "next_id": ("a non-negative integer", _count),
    "identity": ("null or an object (name_or_path, descriptor_dim, image_processor, probe)", _identity),
    "build_report": ("null or an object (batch_size, image_root, skipped)", _build_report),
    "local_features": (f"null or one of {LOCAL_STORAGES}", lambda v: v is None or v in LOCAL_STORAGES),
    "files": ('an object of file name: {"bytes": size, "sha256": digest}', _files),
}


def _check_manifest(manifest: dict, file: Path) -> None:
    """Refuse (``ValueError`` naming the file and the field) a manifest of missing or ill-typed fields."""
    version = manifest.get("format_version", 1)
    if not _count(version, 1):
        raise ValueError(f"damaged index manifest {file}: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file.parent} was written by a newer vprhub (index format {version}); upgrade vprhub")
    missing = [name for name in _MANIFEST_FIELDS if name not in manifest and name != "local_features"]
    if missing:
        raise ValueError(f"damaged index manifest {file}: it lacks {missing}")
    for name, (expected, valid) in _MANIFEST_FIELDS.items():
        if not valid(manifest.get(name)):
            got = repr(manifest[name])
            got = got if len(got) <= 80 else got[:77] + "..."
            raise ValueError(f"damaged index manifest {file}: {name!r} must be {expected}, got {got}")


def _read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST_FILE
    if not folder.exists():
        raise FileNotFoundError(f"index {folder} does not exist")
    if not file.is_file():
        raise ValueError(f"{folder} is not a vprhub place index (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"damaged index {folder}: cannot parse {MANIFEST_FILE} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a vprhub place index ({MANIFEST_FILE} has no format {FORMAT!r})")
    _check_manifest(manifest, file)
    return manifest
