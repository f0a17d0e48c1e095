"""Dense local features of the database images, kept for SelaVPR re-ranking.

Memory policy: **store** the maps, float16, memory-mapped. Chosen by measurement
(``benchmarks/index_search.py``, 2 shared CPU cores):

* a SelaVPR map at the official 224 x 224 input is 61 x 61 x 128 values: 0.95 MB per image
  in float16 (1.9 MB in float32), on disk; in memory only the pages a query touches;
* re-ranking a query needs the maps of its K = 100 candidates: gathering them (95 MB) from
  the memory-mapped store took 77 ms from the page cache and 0.7-1.2 s from this machine's
  (slow, virtual) disk;
* recomputing them instead means K forward passes of SelaVPR's ViT-L/14: 1.7-12 s per image
  on the same CPU, i.e. 3-20 minutes per query (a GPU, not measured here, shortens that but
  still needs the database images at query time and 100 forward passes per query);
* float16 keeps the re-ranking exact where it matters: on the official parity fixture
  (query R0 against R0, R1, R2, E0) the mutual-NN counts with float16-stored candidates are
  the official 3721, 1863, 1854, 0 (the query map stays float32).

The price is disk: 0.95 GB per 1000 images, so a million-image map needs ~1 TB. Two bounded
options (``LOCAL_STORAGES``, chosen at build time; costs in the README, "Maps beyond one machine",
measured by ``benchmarks/rerank.py``):

* ``int8``: the unit-norm vectors' components lie in [-1, 1]; each is stored as
  ``round(127 x)`` (symmetric, one fixed scale) and read back as ``q / 127`` in float32: half the
  bytes of float16;
* ``recompute``: no maps are stored; re-ranking re-embeds the K candidates from their recorded
  image paths (on the pipeline's device: a GPU makes this practical).

Or build with ``store_local_features=False`` (global retrieval only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..descriptor_store import LOCAL_DTYPE as STORE_DTYPE

#: How an index keeps SelaVPR local features: stored maps (float16 or int8) or none (recompute).
LOCAL_STORAGES = ("float16", "int8", "recompute")
INT8_SCALE = 127.0
STORED_DTYPES = {"float16": np.dtype(STORE_DTYPE), "int8": np.dtype(np.int8)}

FEATURES_FILE = "local_features.npy"
IDS_FILE = "local_ids.npy"
_COPY_ROWS = 1024


class LocalFeatureStore:
    """Per-entry local feature maps ``[h, w, C]`` addressed by the index's entry ids.

    Rows live in blocks (a memory-mapped block from disk, then in-memory blocks from later
    ``add`` calls); ids are increasing in row order, so lookups are a binary search.
    """

    def __init__(self, map_shape: tuple[int, ...], storage: str = "float16") -> None:
        if storage not in STORED_DTYPES:
            raise ValueError(f"local features are stored as {' or '.join(STORED_DTYPES)}, got {storage!r}")
        self.map_shape = tuple(int(s) for s in map_shape)
        self.storage = storage
        self._dtype = STORED_DTYPES[storage]
        self._blocks: list[np.ndarray] = []
        self._ids = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return int(self._live.sum())

    @property
    def nbytes_per_entry(self) -> int:
        return int(np.prod(self.map_shape)) * self._dtype.itemsize

    def add(self, ids: np.ndarray, features: np.ndarray) -> None:
        """Append maps for new, increasing ``ids``."""
        features = np.asarray(features)
        if features.ndim != 4 or tuple(features.shape[1:]) != self.map_shape:
            raise ValueError(
                f"local features must have shape [N, {', '.join(map(str, self.map_shape))}], "
                f"got {list(features.shape)}"
            )
        if len(self._ids) and len(ids) and ids[0] <= self._ids[-1]:
            raise ValueError("local feature ids must increase")
        if self.storage == "int8":
            features = np.rint(np.clip(features, -1.0, 1.0) * INT8_SCALE)
        self._blocks.append(features.astype(self._dtype, copy=False))
        self._ids = np.concatenate([self._ids, ids])
        self._live = np.concatenate([self._live, np.ones(len(ids), dtype=bool)])

    def remove(self, ids: np.ndarray) -> None:
        self._live[self._rows(ids)] = False

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The maps of ``ids`` as ``[len(ids), h, w, C]``, in the given order (float16, or int8
        dequantised to float32)."""
        stored = self._stored(ids)
        return stored.astype(np.float32) / INT8_SCALE if self.storage == "int8" else stored

    def _stored(self, ids: np.ndarray) -> np.ndarray:
        rows = self._rows(np.asarray(ids, dtype=np.int64))
        out = np.empty((len(rows), *self.map_shape), dtype=self._dtype)
        starts = np.cumsum([0] + [len(b) for b in self._blocks])
        block_of = np.searchsorted(starts, rows, side="right") - 1
        for b in np.unique(block_of):
            sel = block_of == b
            out[sel] = self._blocks[b][rows[sel] - starts[b]]
        return out

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self._ids, ids)
        found = rows < len(self._ids)
        found[found] = (self._ids[rows[found]] == ids[found]) & self._live[rows[found]]
        if not found.all():
            raise KeyError(f"no local features for ids {ids[~found][:10].tolist()}")
        return rows

    def save(self, folder: Path) -> None:
        """Write the live rows to ``folder`` (streamed in chunks, never all in memory)."""
        live_rows = np.flatnonzero(self._live)
        out = np.lib.format.open_memmap(
            folder / FEATURES_FILE, mode="w+", dtype=self._dtype, shape=(len(live_rows), *self.map_shape)
        )
        for start in range(0, len(live_rows), _COPY_ROWS):
            chunk = self._ids[live_rows[start : start + _COPY_ROWS]]
            out[start : start + len(chunk)] = self._stored(chunk)
        out.flush()
        del out
        np.save(folder / IDS_FILE, self._ids[live_rows])

    @classmethod
    def load(cls, folder: Path) -> LocalFeatureStore:
        """Memory-map the maps written by :meth:`save`."""
        features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        ids = np.load(folder / IDS_FILE)
        storage = {dtype: name for name, dtype in STORED_DTYPES.items()}.get(features.dtype)
        if features.ndim != 4 or len(ids) != len(features) or storage is None:
            raise ValueError(
                f"{folder}: local features {list(features.shape)} {features.dtype} do not match "
                f"{len(ids)} ids"
            )
        store = cls(features.shape[1:], storage)
        if len(ids):
            store._blocks.append(features)
            store._ids = ids.astype(np.int64)
            store._live = np.ones(len(ids), dtype=bool)
        return store
