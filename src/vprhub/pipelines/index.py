"""PlaceIndex: a persistent faiss index of place descriptors with stable ids and metadata.

On disk an index is one folder (``map.vprindex/``), written atomically:

* ``vprindex.json``: format, dimension, index type, search parameters, the model identity
  (name, config hash, preprocessing, probe descriptors), the build report and the size of
  every other file (a truncated file is caught on load);
* ``index.faiss``: the faiss index (``IndexIDMap2`` around the chosen structure);
* ``entries.jsonl``: one ``{"id": ..., "metadata": {...}}`` line per entry, in id order;
* ``local_features.npy`` + ``local_ids.npy`` (optional): float16 dense local features for
  SelaVPR re-ranking (see :mod:`vprhub.pipelines.local_store` for the memory policy).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..utils import atomic_write_dir
from .local_store import FEATURES_FILE, IDS_FILE, LocalFeatureStore

FORMAT = "vprhub-place-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "vprindex.json"
FAISS_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
INDEX_TYPES = ("flat", "ivf", "pq", "ivfpq", "hnsw")
_SIZED_TYPES = ("ivf", "pq", "ivfpq")  # their faiss structure is sized by the training set
# Probe descriptors of one model agree to cosine 1 - 1e-5 across float32 / float16 / bfloat16
# (measured on a ViT-L SelaVPR);
# another model (or other weights) disagrees far more.
PROBE_MIN_COSINE = 0.999


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


def factory_string(index_type: str, dim: int, num_train: int) -> str:
    """The faiss ``index_factory`` string of a named index type for ``num_train`` vectors.

    ``index_type`` is one of :data:`INDEX_TYPES` or any faiss factory string (``"IVF1024,PQ64"``).
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
    try:
        faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(
            f"unknown index type {index_type!r}: use one of {INDEX_TYPES} or a faiss index_factory string"
        ) from None
    return index_type


def _default_search_params(factory: str, num_lists: int | None) -> dict[str, int]:
    if num_lists is not None:
        return {"nprobe": min(num_lists, max(8, num_lists // 8))}
    if factory.startswith("HNSW"):
        return {"efSearch": 128}
    return {}


def _as_matrix(descriptors: Any, dim: int, what: str) -> np.ndarray:
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape [N, {dim}] (or [{dim}]), got {list(np.shape(descriptors))}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(x)


def _check_metadata(metadata: Sequence[Mapping] | None, n: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(n)]
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"got {len(metadata)} metadata rows for {n} descriptors")
    for i, row in enumerate(metadata):
        if not isinstance(row, Mapping):
            raise ValueError(f"metadata row {i} must be a mapping, got {type(row).__name__}")
        try:
            json.dumps(row)
        except TypeError as err:
            raise ValueError(f"metadata row {i} is not JSON-serialisable: {err}") from None
    return [dict(row) for row in metadata]


class PlaceIndex:
    """Global descriptors (inner product = cosine for L2-normalised descriptors) with stable ids.

    Args:
        dim: descriptor width D.
        index_type: ``"flat"`` (exact, default), ``"ivf"``, ``"pq"``, ``"ivfpq"``, ``"hnsw"``,
            or any faiss factory string. All but flat and hnsw are trained on the first
            descriptors added (or on :meth:`train`). The PQ code size (64 bytes by default)
            bounds the recall: on 20k random clustered 8448-d descriptors ``IVF128,PQ64x8np``
            found the exact nearest neighbour in its top 10 for 60% of queries,
            ``IVF128,PQ264x8np`` for 100% (``benchmarks/index_search.py``).
        identity: what produced the descriptors (see ``PlaceRecognitionPipeline.identity``);
            queries from another model are refused.
        search_params: faiss search-time parameters, e.g. ``{"nprobe": 32}`` or ``{"efSearch": 128}``.

    Every entry gets an id that never changes (``add`` returns them; ``remove`` leaves the
    others alone) and a JSON-able metadata dict (path, coordinates, ...).
    """

    def __init__(
        self,
        dim: int,
        index_type: str = "flat",
        identity: Mapping[str, Any] | None = None,
        search_params: Mapping[str, int] | None = None,
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.index_type = index_type
        self.identity = dict(identity) if identity is not None else None
        self.factory: str | None = None
        self.search_params = dict(search_params or {})
        self.local_features: LocalFeatureStore | None = None
        self.build_report: dict[str, Any] | None = None
        self._index: faiss.IndexIDMap2 | None = None
        self._metadata: dict[int, dict] = {}
        self._next_id = 0
        if index_type not in _SIZED_TYPES:
            self._create(factory_string(index_type, self.dim, 0))

    # ------------------------------------------------------------------ structure
    def _create(self, factory: str) -> None:
        self._index = faiss.index_factory(self.dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        self.factory = factory
        ivf = faiss.try_extract_index_ivf(self._index)
        defaults = _default_search_params(factory, ivf.nlist if ivf is not None else None)
        self.search_params = {**defaults, **self.search_params}
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        space = faiss.ParameterSpace()
        for name, value in self.search_params.items():
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError:
                raise ValueError(f"search parameter {name!r} does not apply to a {self.factory} index") from None

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW)."""
        self.search_params.update(params)
        if self._index is not None:
            self._apply_search_params()

    @property
    def is_trained(self) -> bool:
        return self._index is not None and self._index.is_trained

    def train(self, descriptors: Any) -> None:
        """Train the IVF / PQ structure on representative descriptors (the database or a sample)."""
        x = _as_matrix(descriptors, self.dim, "training descriptors")
        if self.is_trained:
            raise ValueError("the index is already trained")
        if len(x) < 2:
            raise ValueError(f"a {self.index_type} index needs at least 2 descriptors to train, got {len(x)}")
        if self._index is None:
            self._create(factory_string(self.index_type, self.dim, len(x)))
        self._index.train(x)

    # ------------------------------------------------------------------ entries
    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def ids(self) -> np.ndarray:
        """Ids of the entries, increasing."""
        return np.fromiter(self._metadata, dtype=np.int64, count=len(self._metadata))

    def add(
        self,
        descriptors: Any,
        metadata: Sequence[Mapping] | None = None,
        local_features: Any = None,
    ) -> np.ndarray:
        """Add ``[N, D]`` descriptors (trains the index first if needed); returns their ids.

        ``local_features`` (``[N, h, w, C]``) are required once the index keeps them, and
        accepted on the first ``add`` of an empty index to start keeping them.
        """
        x = _as_matrix(descriptors, self.dim, "descriptors")
        rows = _check_metadata(metadata, len(x))
        if local_features is not None:
            local_features = np.asarray(local_features)
            if len(local_features) != len(x):
                raise ValueError(f"got {len(local_features)} local feature maps for {len(x)} descriptors")
            if self.local_features is None:
                if len(self):
                    raise ValueError("this index keeps no local features; they can only start with an empty index")
                self.local_features = LocalFeatureStore(local_features.shape[1:])
        elif self.local_features is not None and len(x):
            raise ValueError("this index keeps local features for re-ranking: pass local_features too")
        if not self.is_trained:
            self.train(x)
        ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        if self.local_features is not None:
            self.local_features.add(ids, local_features)
        self._index.add_with_ids(x, ids)
        self._metadata.update(zip(ids.tolist(), rows))
        self._next_id += len(x)
        return ids

    def remove(self, ids: Iterable[int]) -> None:
        """Remove entries by id; the other ids stay valid."""
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        unknown = [i for i in ids.tolist() if i not in self._metadata]
        if unknown:
            raise KeyError(f"no entries with ids {unknown[:10]}")
        try:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            raise ValueError(
                f"a {self.factory} index cannot remove entries; rebuild it (or use flat, ivf, pq or ivfpq)"
            ) from None
        if self.local_features is not None:
            self.local_features.remove(ids)
        for i in ids.tolist():
            del self._metadata[i]

    def metadata(self, ids: Iterable[int]) -> list[dict]:
        """Metadata dicts of ``ids`` (copies), in order."""
        try:
            return [dict(self._metadata[int(i)]) for i in ids]
        except KeyError as err:
            raise KeyError(f"no entry with id {err.args[0]}") from None

    def descriptors(self, ids: Iterable[int]) -> np.ndarray:
        """Stored descriptors of ``ids`` ``[N, D]`` float32, in order (decoded: exact for flat, approximate for PQ)."""
        ids = [int(i) for i in ids]
        self.metadata(ids)  # KeyError naming an unknown id
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            ivf.make_direct_map()
        return np.stack([self._index.reconstruct(i) for i in ids]) if ids else np.zeros((0, self.dim), np.float32)

    def search(self, descriptors: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-``top_k`` entries per query: ``(scores [Q, k] float32, ids [Q, k] int64)``.

        Scores are inner products (cosines for unit descriptors), best first. Approximate
        indices may find fewer than ``top_k`` entries; the missing slots hold id -1 and
        score -inf.
        """
        x = _as_matrix(descriptors, self.dim, "query descriptors")
        if not len(self):
            raise ValueError("the index is empty: add descriptors before searching")
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > len(self):
            raise ValueError(f"top_k={top_k} is larger than the index ({len(self)} entries)")
        scores, ids = self._index.search(x, int(top_k))
        scores[ids < 0] = -np.inf
        return scores, ids

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

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        pipeline_or_model: Any,
        images: Sequence[Any],
        metadata: Sequence[Mapping] | None = None,
        batch_size: int = 8,
        index_type: str = "flat",
        store_local_features: bool | None = None,
        progress: bool = True,
    ) -> PlaceIndex:
        """Embed ``images`` and index them; unreadable inputs are skipped and reported.

        Args:
            pipeline_or_model: a ``PlaceRecognitionPipeline``, a vprhub model, or a model path / hub id.
            images: paths, URLs, PIL images or arrays (see ``load_place_image``).
            metadata: one JSON-able dict per image; ``path`` is filled in for path inputs.
            batch_size: images per model batch. Batches are consecutive readable images in
                input order (the last may be smaller): this is the batching rule that makes
                batch-dependent models (CricaVPR cross-image mode) reproducible; queries should
                use the same batch size.
            index_type: see :class:`PlaceIndex`.
            store_local_features: keep dense local features for re-ranking; default: when the
                model produces them (SelaVPR).
            progress: show a tqdm progress bar.

        A corrupt, truncated or non-image input is skipped with a warning and listed in
        ``index.build_report["skipped"]``; the build completes.
        """
        from tqdm.auto import tqdm

        from .place_recognition import as_pipeline, load_place_image

        pipe = as_pipeline(pipeline_or_model)
        images = list(images)
        rows = _check_metadata(metadata, len(images))
        if store_local_features is None:
            store_local_features = pipe.produces_local_features
        index = cls(pipe.descriptor_dim, index_type=index_type, identity=pipe.identity())
        report = {"images": len(images), "indexed": 0, "skipped": [], "batch_size": batch_size}
        pending: list[tuple[np.ndarray, list[dict], np.ndarray | None]] = []
        start = time.perf_counter()

        def embed(batch: list, batch_rows: list[dict]) -> None:
            outputs = pipe(batch, batch_size=len(batch), return_local_features=store_local_features)
            desc = np.stack([o["descriptor"] for o in outputs]) if store_local_features else np.stack(outputs)
            local = np.stack([o["local_features"] for o in outputs]) if store_local_features else None
            if index.is_trained:
                index.add(desc, batch_rows, local)
            else:  # IVF / PQ: train on the whole database, then add
                pending.append((desc, batch_rows, local))

        batch, batch_rows = [], []
        with tqdm(total=len(images), desc="indexing", unit="img", disable=not progress) as bar:
            for item, row in zip(images, rows):
                try:
                    batch.append(load_place_image(item))
                except ValueError as err:
                    warnings.warn(f"skipping {_describe(item)}: {err}", stacklevel=2)
                    report["skipped"].append({"input": _describe(item), "error": str(err)})
                    bar.update(1)
                    continue
                batch_rows.append({"path": str(item)} | row if isinstance(item, (str, os.PathLike)) else row)
                if len(batch) == batch_size:
                    embed(batch, batch_rows)
                    bar.update(len(batch))
                    batch, batch_rows = [], []
            if batch:
                embed(batch, batch_rows)
                bar.update(len(batch))
        if pending:
            desc, meta, local = zip(*pending)
            local = np.concatenate(local) if store_local_features else None
            index.add(np.concatenate(desc), [row for batch_rows in meta for row in batch_rows], local)
        if not len(index):
            raise ValueError(f"no readable image among the {len(images)} inputs: the index would be empty")
        seconds = time.perf_counter() - start
        report.update(indexed=len(index), seconds=round(seconds, 3), images_per_second=round(len(index) / seconds, 2))
        index.build_report = report
        return index

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the index folder atomically (a failure leaves any previous index untouched)."""
        if self._index is None:
            raise ValueError("the index was never trained or filled: nothing to save")
        with atomic_write_dir(path, overwrite=overwrite) as tmp:
            faiss.write_index(self._index, str(tmp / FAISS_FILE))
            with open(tmp / ENTRIES_FILE, "w", encoding="utf-8") as handle:
                for i, row in self._metadata.items():
                    handle.write(json.dumps({"id": i, "metadata": row}) + "\n")
            if self.local_features is not None:
                self.local_features.save(tmp)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dim": self.dim,
                "metric": "inner_product",
                "index_type": self.index_type,
                "factory": self.factory,
                "search_params": self.search_params,
                "num_entries": len(self),
                "next_id": self._next_id,
                "identity": self.identity,
                "build_report": self.build_report,
                "files": files,
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlaceIndex:
        """Read an index folder written by :meth:`save`; a damaged folder raises ``ValueError``."""
        folder = Path(path)
        manifest = _read_manifest(folder)
        for name, size in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise ValueError(f"damaged index {folder}: {name} is missing")
            if file.stat().st_size != size:
                raise ValueError(f"damaged index {folder}: {name} has {file.stat().st_size} bytes, expected {size}")
        index = cls(manifest["dim"], manifest["index_type"], manifest["identity"], manifest["search_params"])
        try:
            stored = faiss.read_index(str(folder / FAISS_FILE))
        except RuntimeError as err:
            raise ValueError(f"damaged index {folder}: cannot read {FAISS_FILE} ({err})") from None
        if not isinstance(stored, faiss.IndexIDMap2) or stored.d != index.dim:
            raise ValueError(f"damaged index {folder}: {FAISS_FILE} is not a {index.dim}-d id-mapped index")
        index._index = stored
        index.factory = manifest["factory"]
        index._apply_search_params()
        try:
            with open(folder / ENTRIES_FILE, encoding="utf-8") as handle:
                entries = [json.loads(line) for line in handle]
            index._metadata = {int(e["id"]): e["metadata"] for e in entries}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"damaged index {folder}: cannot read {ENTRIES_FILE} ({err})") from None
        if FEATURES_FILE in manifest["files"] and IDS_FILE in manifest["files"]:
            index.local_features = LocalFeatureStore.load(folder)
        counts = {"faiss": len(index), "entries": len(index._metadata), "manifest": manifest["num_entries"]}
        if index.local_features is not None:
            counts["local features"] = len(index.local_features)
        if len(set(counts.values())) != 1:
            raise ValueError(f"damaged index {folder}: entry counts disagree {counts}")
        index._next_id = int(manifest["next_id"])
        index.build_report = manifest["build_report"]
        return index

    def __repr__(self) -> str:
        model = (self.identity or {}).get("name_or_path")
        return (
            f"PlaceIndex(entries={len(self)}, dim={self.dim}, type={self.factory or self.index_type!r}, "
            f"model={model!r}, local_features={self.local_features is not None})"
        )


def _describe(item: Any) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"


def _read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise ValueError(f"{folder} is not a vprhub place index (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"damaged index {folder}: cannot parse {MANIFEST_FILE} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a vprhub place index ({MANIFEST_FILE} has no format {FORMAT!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{folder} was written by a newer vprhub (index format {manifest['format_version']}); upgrade vprhub"
        )
    missing = {"dim", "index_type", "factory", "files", "num_entries", "next_id"} - manifest.keys()
    if missing:
        raise ValueError(f"damaged index {folder}: {MANIFEST_FILE} lacks {sorted(missing)}")
    return manifest
