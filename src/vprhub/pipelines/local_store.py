"""Dense local features of the database images, kept for SelaVPR re-ranking.

Memory policy (measured by ``benchmarks/index_search.py``): a SelaVPR local map at the
official 224 x 224 input is 61 x 61 x 128 values, 0.95 MB per image in float16. Re-ranking
needs the maps of the K = 100 candidates of every query. Recomputing them means K forward
passes of a ViT-L per query (seconds on a GPU, minutes on CPU), while reading 100 stored
maps from a memory-mapped file costs tens of milliseconds. So the maps are **stored**, in
float16 (the mutual-nearest-neighbour counts only compare dot products of unit vectors;
half precision keeps them to about 1e-3, the float32 map is twice the disk), in one
``.npy`` file that is memory-mapped on load: the operating system pages in only the
candidates a query touches, so resident memory stays at the page cache, not N x 0.95 MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STORE_DTYPE = np.float16
FEATURES_FILE = "local_features.npy"
IDS_FILE = "local_ids.npy"
_COPY_ROWS = 1024


class LocalFeatureStore:
    """Per-entry local feature maps ``[h, w, C]`` addressed by the index's entry ids.

    Rows live in blocks (a memory-mapped block from disk, then in-memory blocks from later
    ``add`` calls); ids are increasing in row order, so lookups are a binary search.
    """

    def __init__(self, map_shape: tuple[int, ...]) -> None:
        self.map_shape = tuple(int(s) for s in map_shape)
        self._blocks: list[np.ndarray] = []
        self._ids = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return int(self._live.sum())

    @property
    def nbytes_per_entry(self) -> int:
        return int(np.prod(self.map_shape)) * np.dtype(STORE_DTYPE).itemsize

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
        self._blocks.append(features.astype(STORE_DTYPE, copy=False))
        self._ids = np.concatenate([self._ids, ids])
        self._live = np.concatenate([self._live, np.ones(len(ids), dtype=bool)])

    def remove(self, ids: np.ndarray) -> None:
        self._live[self._rows(ids)] = False

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The maps of ``ids`` as ``[len(ids), h, w, C]`` float16, in the given order."""
        rows = self._rows(np.asarray(ids, dtype=np.int64))
        out = np.empty((len(rows), *self.map_shape), dtype=STORE_DTYPE)
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
            folder / FEATURES_FILE, mode="w+", dtype=STORE_DTYPE, shape=(len(live_rows), *self.map_shape)
        )
        for start in range(0, len(live_rows), _COPY_ROWS):
            chunk = self._ids[live_rows[start : start + _COPY_ROWS]]
            out[start : start + len(chunk)] = self.get(chunk)
        out.flush()
        del out
        np.save(folder / IDS_FILE, self._ids[live_rows])

    @classmethod
    def load(cls, folder: Path) -> LocalFeatureStore:
        """Memory-map the maps written by :meth:`save`."""
        features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        ids = np.load(folder / IDS_FILE)
        if features.ndim != 4 or len(ids) != len(features) or features.dtype != STORE_DTYPE:
            raise ValueError(
                f"{folder}: local features {list(features.shape)} {features.dtype} do not match "
                f"{len(ids)} ids"
            )
        store = cls(features.shape[1:])
        if len(ids):
            store._blocks.append(features)
            store._ids = ids.astype(np.int64)
            store._live = np.ones(len(ids), dtype=bool)
        return store
