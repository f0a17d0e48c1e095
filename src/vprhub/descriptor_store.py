"""An on-disk store of descriptors in shards: written atomically, resumable, read out of core.

Layout of a store folder::

    store.json                  format, the key of what was embedded (model identity, precision,
                                batching, inputs), number of inputs, shard size, dtype
    shard-000000/               one folder per shard, renamed into place when complete:
        rows.npy                int64 input positions embedded (skipped inputs are absent)
        descriptors.npy         [n, D] float32 or float16
        local_features.npy      [n, h, w, C] float16 (SelaVPR, optional)
        skipped.json            [{"index", "input", "error"}] inputs of the shard that were skipped
        checksums.json          SHA-256 of each file above: a shard damaged on disk is refused

A shard exists completely or not at all (``utils.atomic_write_dir``); a killed run leaves at
most a hidden temporary folder, removed when the shard is written again. Reading memory-maps
the shards, so a store of 10^6 descriptors never needs to fit in RAM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .utils import atomic_write_dir, atomic_write_file, holds_only, sha256_file

FORMAT = "vprhub-descriptor-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "store.json"
STORE_DTYPES = ("float32", "float16")
#: Local feature maps are always stored in float16 (see ``pipelines/local_store.py`` for why).
LOCAL_DTYPE = np.float16
_SHARD_NAME = re.compile(r"shard-(\d{6})$")
_STALE_TMP = re.compile(r"\.shard-\d{6}\..*\.tmp$")
CHECKSUMS_FILE = "checksums.json"
_STORE_ENTRIES = re.compile(rf"{re.escape(MANIFEST_FILE)}|shard-\d{{6}}")


@dataclass
class Shard:
    """The result of embedding one shard of the inputs."""

    index: int
    rows: np.ndarray  # int64 [n] input positions, increasing
    descriptors: np.ndarray  # [n, D]
    local_features: np.ndarray | None = None  # [n, h, w, C]
    skipped: list[dict] = field(default_factory=list)


class DescriptorStore:
    """A store folder opened for reading or (resumed) writing; see the module docstring."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path, self.manifest = path, manifest

    @property
    def num_shards(self) -> int:
        return -(-self.manifest["num_inputs"] // self.manifest["shard_size"])

    @classmethod
    def create(cls, path: str | os.PathLike, key: Mapping[str, Any], num_inputs: int, shard_size: int, dtype: str):
        """Open ``path`` for writing: a new store, or the same store resumed (finished shards kept).

        A folder holding another store (another key) or anything else is refused.
        """
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        path = Path(path)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": json.loads(json.dumps(key, default=str)),
            "num_inputs": int(num_inputs),
            "shard_size": int(shard_size),
            "dtype": dtype,
        }
        if (path / MANIFEST_FILE).is_file():
            existing = cls.open(path).manifest
            if {k: existing.get(k) for k in manifest} != manifest:
                raise FileExistsError(
                    f"{path} holds descriptors of other inputs, model or settings; remove it or choose another store"
                )
            return cls(path, existing)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not a vprhub descriptor store")
        path.mkdir(parents=True, exist_ok=True)
        with atomic_write_file(path / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=1)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> DescriptorStore:
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable vprhub descriptor store ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a vprhub descriptor store")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer vprhub; upgrade vprhub")
        return cls(path, manifest)

    def holds_only_its_files(self) -> bool:
        """Whether the folder holds nothing but the manifest and shards (what vprhub wrote)."""
        return holds_only(self.path, _STORE_ENTRIES)

    def shard_path(self, index: int) -> Path:
        return self.path / f"shard-{index:06d}"

    def shard_rows(self, index: int) -> range:
        """Input positions of shard ``index``."""
        size = self.manifest["shard_size"]
        return range(index * size, min((index + 1) * size, self.manifest["num_inputs"]))

    def finished(self) -> set[int]:
        return {int(m.group(1)) for p in self.path.iterdir() if (m := _SHARD_NAME.match(p.name)) and p.is_dir()}

    @property
    def complete(self) -> bool:
        return len(self.finished()) == self.num_shards

    def remove_stale(self, shards: set[int]) -> None:
        """Delete temporaries a killed run left for ``shards`` (those this process writes)."""
        for p in self.path.iterdir():
            if _STALE_TMP.match(p.name) and int(p.name[7:13]) in shards:
                shutil.rmtree(p, ignore_errors=True)

    def write(self, shard: Shard) -> None:
        """Write one shard atomically."""
        dtype = np.dtype(self.manifest["dtype"])
        with atomic_write_dir(self.shard_path(shard.index)) as tmp:
            np.save(tmp / "rows.npy", shard.rows.astype(np.int64))
            np.save(tmp / "descriptors.npy", shard.descriptors.astype(dtype, copy=False))
            if shard.local_features is not None:
                np.save(tmp / "local_features.npy", shard.local_features.astype(LOCAL_DTYPE, copy=False))
            (tmp / "skipped.json").write_text(json.dumps(shard.skipped), encoding="utf-8")
            checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums), encoding="utf-8")

    def read(self, index: int) -> Shard:
        """Shard ``index``, memory-mapped."""
        folder = self.shard_path(index)
        try:
            if altered := _altered_files(folder):
                raise ValueError(f"{', '.join(altered)} changed on disk since written (SHA-256)")
            rows = np.load(folder / "rows.npy")
            descriptors = np.load(folder / "descriptors.npy", mmap_mode="r")
            local_file = folder / "local_features.npy"
            local = np.load(local_file, mmap_mode="r") if local_file.is_file() else None
            skipped = json.loads((folder / "skipped.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"damaged descriptor store {self.path}: shard {index} ({err})") from None
        problem = _shard_problem(rows, skipped, self.shard_rows(index)) or self._descriptors_problem(descriptors)
        if problem is None and (len(rows) != len(descriptors) or (local is not None and (local.ndim != 4 or len(local) != len(rows)))):
            problem = "has mismatched row counts or local features that are not [n, h, w, C]"
        if problem:
            raise ValueError(f"damaged descriptor store {self.path}: shard {index} {problem}")
        return Shard(index, rows, descriptors, local, skipped)

    def _descriptors_problem(self, descriptors: np.ndarray) -> str | None:
        """What is wrong with a shard's descriptors, if anything: ``[n, D]`` of the store's dtype, ``D``
        the ``descriptor_dim`` of the model identity in the key (when it has one)."""
        dtype = self.manifest.get("dtype")
        identity = self.manifest["key"].get("identity") if isinstance(self.manifest["key"], dict) else None
        width = identity.get("descriptor_dim") if isinstance(identity, dict) else None
        if descriptors.dtype.name != dtype or descriptors.ndim != 2 or width not in (None, descriptors.shape[1]):
            expected = f"[n, {width if width is not None else 'D'}] {dtype}"
            return f"has descriptors.npy of {descriptors.dtype} {list(descriptors.shape)}, expected {expected}"
        return None

    def shards(self) -> Iterator[Shard]:
        """Every shard in order (memory-mapped); the store must be complete."""
        if not self.complete:
            missing = sorted(set(range(self.num_shards)) - self.finished())
            raise ValueError(f"descriptor store {self.path} is incomplete: shards {missing[:10]} missing")
        for index in range(self.num_shards):
            yield self.read(index)

    def skipped(self) -> list[dict]:
        return [item for shard in self.shards() for item in shard.skipped]


def _altered_files(folder: Path) -> list[str]:
    """The files of a shard whose SHA-256 differs from the one recorded when it was written
    (a shard written before checksums were recorded has nothing to compare)."""
    checksums_file = folder / CHECKSUMS_FILE
    if not checksums_file.is_file():
        return []
    checksums = json.loads(checksums_file.read_text(encoding="utf-8"))
    if not isinstance(checksums, dict):
        return [CHECKSUMS_FILE]
    on_disk = {p.name for p in folder.iterdir()} - {CHECKSUMS_FILE}
    return sorted(
        name for name in on_disk | set(checksums)
        if name not in on_disk or name not in checksums or sha256_file(folder / name) != checksums[name]
    )


def _shard_problem(rows: np.ndarray, skipped: Any, expected: range) -> str | None:
    """What is wrong with a shard's ``rows`` and ``skipped`` entries, if anything: together they
    must name every input position of ``expected`` once, rows increasing."""
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        return f"has rows.npy of {rows.dtype} {list(rows.shape)}, expected 1-d integers"
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        return "has rows.npy that is not strictly increasing"
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("input"), str)
        and isinstance(s.get("error"), str) for s in skipped
    ):
        return 'has skipped.json that is not a list of {"index", "input", "error"} entries'
    covered = sorted(rows.tolist() + [s["index"] for s in skipped])
    if covered != list(expected):
        return f"rows.npy and skipped.json do not cover its inputs {expected.start}..{expected.stop - 1} exactly once"
    return None


class ShardedArray:
    """Rows of several arrays (memory-mapped shards) read as one ``[N, ...]`` array, out of core.

    Supports ``len``, ``shape``, ``dtype``, ``np.asarray`` and indexing by an int, a slice or
    an integer array (rows come back in the asked order).
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedArray needs at least one part")
        self.parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.concatenate(self.parts).astype(dtype or self.dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self._starts, rows, side="right") - 1
        for part in np.unique(part_of):
            selected = part_of == part
            out[selected] = self.parts[part][rows[selected] - self._starts[part]]
        return out
