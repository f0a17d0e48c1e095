"""Descriptor extraction for evaluation, through the embedding engine, with an optional disk cache.

Batching rule (the engine's, as the official evaluations): images go through the model in
file order, ``batch_size`` at a time; callers extract database and queries separately.
CricaVPR's descriptors depend on the other images of a batch, so its numbers are only
comparable at the same batch size and order; the cache key includes both.

The cache is a resumable :class:`~vprhub.descriptor_store.DescriptorStore` per key: the
model's identity (weights digest included), preprocessing, precision, batching and the
files' paths, sizes and modification times, so an image replaced at the same path is
embedded again. A killed extraction resumes from its finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..descriptor_store import LOCAL_DTYPE, Shard, ShardedArray
from ..embedding import Embedder

_AUTOCAST = {torch.bfloat16: "autocast-bfloat16", torch.float16: "autocast-float16"}


def extract_descriptors(
    model: torch.nn.Module,
    image_processor,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
    return_local: bool = False,
    desc: str = "descriptors",
    skipped: list | None = None,
) -> np.ndarray | tuple[np.ndarray, ShardedArray]:
    """Global descriptors ``[N, D]`` float32 of the images in ``paths``, in order.

    Args:
        model: follows the vprhub model contract (``model(pixel_values=...).descriptors``).
        image_processor: the model's image processor (e.g. its ``AutoImageProcessor``).
        batch_size: images per forward pass (see the batching rule in the module docstring).
        device: where the model runs; it is moved there and put in eval mode for the call.
        dtype: autocast dtype (e.g. ``torch.float16`` on GPU); ``None`` runs in float32.
        cache_dir: if given, descriptors are stored there (one store per key, see the module
            docstring) and reused while model, settings and files are unchanged.
        progress: show a tqdm bar.
        num_workers: decoding processes.
        return_local: also return the ``local_features`` ``[N, h, w, C]`` float16 (read out of
            core, from memory-mapped shards when ``cache_dir`` is given).
        desc: label of the progress bar.
        skipped: if given, unreadable images (decompression bombs included) are appended to
            it as ``{"index", "input", "error"}``.

    An unreadable image is skipped, warned about and counted; its descriptor is the zero
    vector (it matches nothing better than any other). Re-ranking needs every local map, so
    with ``return_local`` an unreadable image is an error.
    """
    if not paths:
        raise ValueError("no images to extract descriptors from")
    if dtype is not None and dtype != torch.float32 and dtype not in _AUTOCAST:
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    was_training = model.training
    try:
        engine = Embedder(
            model,
            image_processor,
            device=device,
            precision=_AUTOCAST.get(dtype, "float32"),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        if cache_dir is None:
            shards = list(engine.stream(paths, return_local, progress=progress, desc=desc))
        else:
            key = json.dumps(engine.store_key(paths, return_local), sort_keys=True, default=str)
            folder = Path(cache_dir) / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
            shards = list(engine.embed_to_store(paths, folder, return_local, progress=progress, desc=desc).shards())
    finally:
        model.train(was_training)
    return assemble_descriptors(shards, len(paths), return_local, skipped)


def assemble_descriptors(
    shards: list[Shard], num_inputs: int, return_local: bool = False, skipped: list | None = None
) -> np.ndarray | tuple[np.ndarray, ShardedArray]:
    """The shards of ``num_inputs`` inputs as one ``[N, D]`` array (zero rows for skipped inputs,
    which are warned about and appended to ``skipped``), with the local maps when asked."""
    unreadable = [item for shard in shards for item in shard.skipped]
    if unreadable and return_local:
        names = ", ".join(item["error"] for item in unreadable[:5])
        raise ValueError(f"{len(unreadable)} unreadable images; re-ranking needs all of them: {names}")
    for item in unreadable:
        warnings.warn(f"skipping {item['input']}: {item['error']}", stacklevel=3)
    if skipped is not None:
        skipped += unreadable
    dim = next(shard.descriptors.shape[1] for shard in shards)
    descriptors = np.zeros((num_inputs, dim), np.float32)
    for shard in shards:
        descriptors[shard.rows] = shard.descriptors
    if not return_local:
        return descriptors
    maps = [s.local_features if isinstance(s.local_features, np.memmap) else s.local_features.astype(LOCAL_DTYPE) for s in shards]
    return descriptors, ShardedArray(maps)
