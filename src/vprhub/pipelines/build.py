"""Building a :class:`PlaceIndex` from images with the embedding engine.

``PlaceIndex`` is storage and search only; this module embeds the images
(:class:`vprhub.embedding.Embedder`), shard by shard, and adds the descriptors. Image files
go through a resumable on-disk :class:`~vprhub.descriptor_store.DescriptorStore`: a killed
build, run again with the same ``store``, keeps the finished shards and ends with the same
index; several processes (``accelerate launch``) each embed their share of the store before
the main process indexes it (see ``vprhub index build``).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..descriptor_store import Shard
from ..embedding import Embedder
from .index import PlaceIndex, _check_metadata
from .local_store import LOCAL_STORAGES
from .place_recognition import as_pipeline


def database_embedder(
    pipeline_or_model: Any,
    batch_size: int = 8,
    precision: str | None = None,
    num_workers: int | None = None,
    **options: Any,
) -> Embedder:
    """The engine for a database: the pipeline's model, processor and device (and its precision by default)."""
    pipe = as_pipeline(pipeline_or_model)
    return Embedder(
        pipe.model,
        pipe.image_processor,
        device=pipe.device,
        precision=precision or pipe.engine.precision,
        batch_size=batch_size,
        num_workers=num_workers,
        **options,
    )


def build_index(
    pipeline_or_model: Any,
    images: Sequence[Any],
    metadata: Sequence[Mapping] | None = None,
    batch_size: int = 8,
    index_type: str = "flat",
    store_local_features: bool | None = None,
    progress: bool = True,
    store: str | os.PathLike | None = None,
    num_workers: int | None = None,
    precision: str | None = None,
    local_storage: str = "float16",
) -> PlaceIndex:
    """Embed ``images`` and index them; unreadable inputs are skipped, warned about and reported.

    Args:
        pipeline_or_model: a ``PlaceRecognitionPipeline``, a vprhub model, or a model path / hub id.
        images: paths, URLs, PIL images or arrays (see :func:`vprhub.image_io.open_image`).
        metadata: one JSON-able dict per image; ``path`` is filled in for path inputs (absolute).
        batch_size: images per model batch (the engine's batching rule; queries of a
            batch-dependent model should use the same, and the pipeline does by default).
        index_type: see :class:`PlaceIndex`.
        store_local_features: keep dense local features for re-ranking; default: when the
            model produces them (SelaVPR).
        progress: show a tqdm progress bar.
        store: for image files, a descriptor store folder to (re)use: a killed build resumes
            from it. Default: a temporary store, removed afterwards.
        num_workers: decoding processes (default: one per core).
        precision: see :data:`vprhub.embedding.PRECISIONS` (default: the pipeline's).
        local_storage: how kept local features are stored: ``"float16"``, ``"int8"`` or
            ``"recompute"`` (see :class:`PlaceIndex`).

    The index's ``build_report`` holds images, indexed, skipped (input, error), batch_size,
    seconds, images_per_second and the engine settings.
    """
    if local_storage not in LOCAL_STORAGES:
        raise ValueError(f"unknown local_storage {local_storage!r}: use one of {LOCAL_STORAGES}")
    pipe = as_pipeline(pipeline_or_model)
    images = list(images)
    rows = _check_metadata(metadata, len(images))
    if store_local_features is None:
        store_local_features = pipe.produces_local_features
    engine = database_embedder(pipe, batch_size, precision, num_workers)
    storage = local_storage if store_local_features else "float16"
    store_local_features = store_local_features and local_storage != "recompute"
    start = time.perf_counter()
    if all(isinstance(item, (str, os.PathLike)) for item in images):
        with tempfile.TemporaryDirectory(prefix="vprhub-store-") as scratch:
            path = store if store is not None else os.path.join(scratch, "store")
            opened = engine.embed_to_store(images, path, store_local_features, progress=progress, desc="indexing")
            index = index_from_shards(opened.shards(), images, rows, engine, index_type, storage)
    else:
        shards = engine.stream(images, store_local_features, progress=progress, desc="indexing")
        index = index_from_shards(shards, images, rows, engine, index_type, storage)
    index.build_report["seconds"] = seconds = round(time.perf_counter() - start, 3)
    index.build_report["images_per_second"] = round(len(index) / max(seconds, 1e-9), 2)
    return index


def index_from_shards(
    shards: Iterable[Shard],
    images: Sequence[Any],
    rows: list[dict],
    engine: Embedder,
    index_type: str,
    local_storage: str = "float16",
) -> PlaceIndex:
    """A :class:`PlaceIndex` of the embedded shards (in order); skipped inputs are warned about."""
    index = PlaceIndex(
        engine.identity()["descriptor_dim"], index_type=index_type, identity=engine.identity(), local_storage=local_storage
    )
    report = {"images": len(images), "indexed": 0, "skipped": [], "batch_size": engine.batch_size}
    pending: list[tuple[np.ndarray, list[dict], np.ndarray | None]] = []
    for shard in shards:
        for skipped in shard.skipped:
            warnings.warn(f"skipping {skipped['input']}: {skipped['error']}", stacklevel=3)
            report["skipped"].append({"input": skipped["input"], "error": skipped["error"]})
        if not len(shard.rows):
            continue
        shard_rows = [_with_path(images[i], rows[i]) for i in shard.rows.tolist()]
        local = None if shard.local_features is None else np.asarray(shard.local_features)
        if index.is_trained:
            index.add(np.asarray(shard.descriptors, np.float32), shard_rows, local)
        else:  # IVF / PQ: train on the whole database, then add
            pending.append((np.asarray(shard.descriptors, np.float32), shard_rows, local))
    if pending:
        descriptors, metadata, local = zip(*pending)
        local = None if local[0] is None else np.concatenate(local)
        index.add(np.concatenate(descriptors), [row for batch in metadata for row in batch], local)
    if not len(index):
        raise ValueError(f"no readable image among the {len(images)} inputs: the index would be empty")
    report["indexed"] = len(index)
    report["settings"] = engine.settings
    index.build_report = report
    return index


def _with_path(item: Any, row: dict) -> dict:
    """``row`` with the input's ``path``: absolute for a file (a search from elsewhere finds it), a URL as given."""
    if not isinstance(item, (str, os.PathLike)):
        return row
    text = os.fspath(item)
    return {"path": text if text.startswith(("http://", "https://")) else os.path.abspath(text)} | row

