"""``vprhub index plan``: memory and disk of a map before building it, per storage option.

Sizes are measured, not guessed: for each option a faiss index of the synthetic city
(:func:`~vprhub.pipelines.compression.synthetic_city`, at the model's width) is written at two
sizes with realistic metadata, and every file's size is fitted as ``fixed + per_entry * N``
and extrapolated to the planned number of images. The same sample gives the option's recall
retention: its place recall@1 / recall@1 of exact search on the synthetic city's queries, or,
with an evaluation dataset (:func:`embed_test_set`), on that dataset's queries and positives.
Memory is the faiss index as loaded (its file) plus the id map's hash table, plus the
metadata as Python dicts (measured with ``tracemalloc``); local features are memory-mapped,
so they cost disk, not memory.
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .compression import compression_factory, place_recall, synthetic_city
from .index import PlaceIndex
from .local_store import LOCAL_STORAGES, STORE_DTYPE, STORED_DTYPES

DEFAULT_OPTIONS = ("flat", "fp16", "pca256-fp16", "pcaw256-fp16", "pca256-pq64", "binary512")
ID_MAP_BYTES = 40  # IndexIDMap2's reverse map: one hash-table node per entry, in memory only
_PLACES, _VIEWS = 300, 4  # the sample: 1200 database descriptors (+ 300 queries), and half of it


def _sample_rows(n: int) -> list[dict]:
    return [
        {"path": f"/data/city/images/@{500000 + i:.2f}@{4500000 + i:.2f}@33@T@{i:06d}.jpg",
         "lat": 40.0 + i * 1e-5, "lon": 9.0 + i * 1e-5}
        for i in range(n)
    ]


def _write(option: str, database: np.ndarray, folder: Path) -> tuple[PlaceIndex, dict[str, int]]:
    index = PlaceIndex(database.shape[1], index_type=option)
    index.add(database, _sample_rows(len(database)))
    index.save(folder)
    return index, {p.name: p.stat().st_size for p in folder.iterdir()}


def _metadata_bytes(n: int) -> int:
    tracemalloc.start()
    rows = {i: json.loads(json.dumps(row)) for i, row in enumerate(_sample_rows(n))}
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del rows
    return size


def embed_test_set(pipe, dataset: str | os.PathLike) -> tuple[str, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """An evaluation dataset (see :func:`vprhub.evaluation.load_test_set`) embedded by the
    pipeline's engine: name, database and query descriptors, per-query positives."""
    from ..evaluation import load_test_set
    from .build import database_embedder

    test_set = load_test_set(dataset)
    engine = database_embedder(pipe)
    database = engine.embed(test_set.database_paths).descriptors
    queries = engine.embed(test_set.query_paths).descriptors
    return test_set.name, database, queries, test_set.positives


def _dataset_recall(option: str, dataset: tuple, folder: Path) -> dict[int, float]:
    from ..evaluation.recall import recalls_from_predictions

    _, database, queries, positives = dataset
    index = _write(option, database, folder)[0]  # ids 0..n-1 are the database rows
    _, found = index.search(queries, min(5, len(index)))
    return recalls_from_predictions(found, positives, (1, 5))


def probe_local_shape(pipe) -> tuple[int, ...]:
    """The local feature map shape of one image at the pipeline's input size."""
    from PIL import Image

    output = pipe([Image.new("RGB", (64, 64), (90, 120, 150))], return_local_features=True)[0]
    return tuple(output["local_features"].shape)


def default_options(dim: int) -> list[str]:
    """The :data:`DEFAULT_OPTIONS` that ``dim``-wide descriptors allow (a PCA to 256 needs more than 256)."""

    def fits(option: str) -> bool:
        try:
            return option == "flat" or bool(compression_factory(option, dim))
        except ValueError:
            return False

    return [option for option in DEFAULT_OPTIONS if fits(option)]


def plan(
    num_images: int,
    dim: int,
    options: Sequence[str] | None = None,
    local_feature_shape: Sequence[int] | None = None,
    dataset: tuple | None = None,
) -> list[dict]:
    """One row per option: bytes on disk and in memory for ``num_images`` images, and recall.

    Keys: ``option``, ``factory``, ``disk_bytes`` (per file and ``total``), ``memory_bytes``,
    ``bytes_per_image`` (descriptor file only), ``recall@1``, ``recall@5``, ``retention@1``,
    ``recall_on`` (``"synthetic city"`` or the name of ``dataset``, an :func:`embed_test_set`
    result; its database must be large enough to train the option). ``options`` default to
    :func:`default_options`.
    """
    if num_images < 1:
        raise ValueError(f"--images must be >= 1, got {num_images}")
    options = default_options(dim) if options is None else options
    database, db_places, queries, query_places = synthetic_city(dim, places=_PLACES, views=_VIEWS)
    half = len(database) // 2
    metadata_per_entry = (_metadata_bytes(2000) - _metadata_bytes(1000)) / 1000
    rows, exact_recall = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for option in dict.fromkeys(["flat", *options]):
            small = _write(option, database[:half], Path(tmp) / f"{option}-small")[1]
            index, large = _write(option, database, Path(tmp) / f"{option}-large")
            disk = {}
            for name in large:
                per_entry = (large[name] - small[name]) / (len(database) - half)
                disk[name] = int(round(large[name] + per_entry * (num_images - len(database))))
            if local_feature_shape is not None:
                per_map = int(np.prod(local_feature_shape)) * np.dtype(STORE_DTYPE).itemsize
                disk["local_features.npy"] = 128 + per_map * num_images
                disk["local_ids.npy"] = 128 + 8 * num_images
            disk["total"] = sum(disk.values())
            if dataset is None:
                _, found = index.search(queries, 5)
                recall = {k: place_recall(found, db_places, query_places, k) for k in (1, 5)}
            else:
                recall = _dataset_recall(option, dataset, Path(tmp) / f"{option}-dataset")
            if option == "flat":
                exact_recall = recall[1]
                if "flat" not in options:
                    continue
            faiss_file = disk["index.faiss"]
            memory = faiss_file + ID_MAP_BYTES * num_images + int(metadata_per_entry * num_images)
            rows.append({
                "option": option,
                "factory": index.factory,
                "disk_bytes": disk,
                "memory_bytes": memory,
                "bytes_per_image": faiss_file / num_images,
                "recall@1": recall[1],
                "recall@5": recall[5],
                "retention@1": recall[1] / exact_recall if exact_recall else float("nan"),
                "recall_on": "the synthetic city" if dataset is None else dataset[0],
            })
    return rows


def local_feature_plan(num_images: int, local_feature_shape: Sequence[int]) -> list[dict]:
    """Disk bytes of the SelaVPR local features per storage option (``LOCAL_STORAGES``).

    ``recompute`` stores nothing; its cost is K forward passes per re-ranked query instead.
    """
    rows = []
    for storage in LOCAL_STORAGES:
        itemsize = STORED_DTYPES[storage].itemsize if storage in STORED_DTYPES else 0
        per_map = int(np.prod(local_feature_shape)) * itemsize
        disk = 128 + per_map * num_images + 128 + 8 * num_images if per_map else 0
        rows.append({"storage": storage, "bytes_per_image": per_map, "disk_bytes": disk})
    return rows


def format_local_plan(rows: list[dict], local_feature_shape: Sequence[int]) -> str:
    shape = " x ".join(map(str, local_feature_shape))
    lines = [f"local features ({shape} per image; 'local feat.' above is float16)", f"{'storage':<10} {'B/image':>10} {'disk':>10}"]
    lines += [f"{r['storage']:<10} {r['bytes_per_image']:>10} {human(r['disk_bytes']):>10}" for r in rows]
    return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def format_plan(rows: list[dict], num_images: int, dim: int) -> str:
    lines = [
        f"plan for {num_images} images, {dim}-d descriptors (float32: {human(4 * dim)} per image); "
        f"recall on {rows[0]['recall_on'] if rows else 'the synthetic city'}, exact search = 100 %",
        f"{'option':<14} {'B/image':>9} {'index disk':>11} {'metadata':>10} {'local feat.':>11} {'total disk':>11} "
        f"{'memory':>10} {'R@1':>6} {'R@5':>6} {'kept R@1':>9}",
    ]
    for row in rows:
        disk = row["disk_bytes"]
        local = disk.get("local_features.npy", 0) + disk.get("local_ids.npy", 0)
        lines.append(
            f"{row['option']:<14} {row['bytes_per_image']:>9.0f} {human(disk['index.faiss']):>11} "
            f"{human(disk['entries.jsonl']):>10} {human(local):>11} {human(disk['total']):>11} "
            f"{human(row['memory_bytes']):>10} {row['recall@1']:>6.3f} {row['recall@5']:>6.3f} "
            f"{100 * row['retention@1']:>8.1f}%"
        )
    return "\n".join(lines)


__all__ = ["DEFAULT_OPTIONS", "default_options", "embed_test_set", "format_local_plan", "format_plan", "local_feature_plan", "plan", "probe_local_shape"]
