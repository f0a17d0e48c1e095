"""Descriptor extraction for evaluation: ordered batches, a progress bar and an optional disk cache.

Batching rule (as the official evaluations): images go through the model in file order,
``batch_size`` at a time, the last batch being smaller; callers extract database and queries
separately. CricaVPR's descriptors depend on the other images of a batch, so its numbers are
only comparable at the same batch size and order; the cache key includes both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils import atomic_write_file


class ImageFiles(Dataset):
    """Images read from ``paths`` (RGB) and turned into ``pixel_values`` ``[3, H, W]`` by the processor."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_processor) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _model_fingerprint(model: torch.nn.Module, digest: hashlib.blake2b) -> None:
    config = getattr(model, "config", None)
    digest.update(type(model).__qualname__.encode())
    if config is not None:
        digest.update(config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def cache_key(
    model: torch.nn.Module,
    image_processor,
    paths: Sequence[str | os.PathLike],
    batch_size: int,
    dtype: torch.dtype | None,
    local_features: bool,
) -> str:
    """Hex key of everything the descriptors depend on: weights, config, preprocessing, files, batching."""
    digest = hashlib.blake2b(digest_size=16)
    _model_fingerprint(model, digest)
    digest.update(image_processor.to_json_string().encode())
    digest.update("\n".join(str(Path(p).absolute()) for p in paths).encode())
    digest.update(f"batch_size={batch_size} dtype={dtype} local={local_features}".encode())
    return digest.hexdigest()


def _model_outputs(model, pixel_values: torch.Tensor, local_features: bool):
    output = model(pixel_values=pixel_values)
    descriptors = getattr(output, "descriptors", None)
    if descriptors is None or descriptors.ndim != 2 or len(descriptors) != len(pixel_values):
        raise ValueError(
            f"{type(model).__name__} must return `descriptors` [B, D] for B={len(pixel_values)} images, got "
            f"{None if descriptors is None else list(descriptors.shape)}"
        )
    local = getattr(output, "local_features", None) if local_features else None
    if local_features and local is None:
        raise ValueError(f"{type(model).__name__} returns no `local_features`; re-ranking needs a model that does")
    return descriptors, local


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
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Global descriptors ``[N, D]`` float32 of the images in ``paths``, in order.

    Args:
        model: follows the vprhub model contract (``model(pixel_values=...).descriptors``).
        image_processor: turns one PIL image into ``pixel_values`` (e.g. the model's ``AutoImageProcessor``).
        batch_size: images per forward pass (see the batching rule in the module docstring).
        device: where the model runs; it is moved there and put in eval mode for the call.
        dtype: autocast dtype (e.g. ``torch.float16`` on GPU); ``None`` runs in the model's dtype.
        cache_dir: if given, results are stored there as ``<key>.npy`` (written atomically) and
            reused when weights, preprocessing, files and batching are unchanged.
        progress: show a tqdm bar.
        num_workers: DataLoader worker processes for reading and preprocessing images.
        return_local: also return the ``local_features`` ``[N, h, w, C]`` as float16 (memory-mapped
            from the cache file when ``cache_dir`` is given).
        desc: label of the progress bar.
    """
    if not paths:
        raise ValueError("no images to extract descriptors from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    if cache_dir is not None:
        key = cache_key(model, image_processor, paths, batch_size, dtype, return_local)
        global_path = Path(cache_dir) / f"{key}.npy"
        local_path = Path(cache_dir) / f"{key}.local.npy"
        if global_path.is_file() and (not return_local or local_path.is_file()):
            descriptors = np.load(global_path)
            return (descriptors, np.load(local_path, mmap_mode="r")) if return_local else descriptors
    loader = DataLoader(
        ImageFiles(paths, image_processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype is not None and dtype != torch.float32
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.to(device).eval()
    descriptors, local_chunks, local_shape = [], [], None
    try:
        with contextlib.ExitStack() as stack:
            local_file = (
                stack.enter_context(atomic_write_file(local_path)) if return_local and cache_dir is not None else None
            )
            bar = stack.enter_context(tqdm(total=len(paths), desc=desc, unit="img", disable=not progress))
            for pixel_values in loader:
                with torch.inference_mode(), autocast:
                    batch_descriptors, local = _model_outputs(
                        model, pixel_values.to(device, non_blocking=True), return_local
                    )
                descriptors.append(batch_descriptors.float().cpu().numpy())
                if local is not None:
                    local = np.ascontiguousarray(local.to(torch.float16).cpu().numpy())
                    if local_shape is None:
                        local_shape = local.shape[1:]
                        if local_file is not None:
                            header = {"descr": "<f2", "fortran_order": False, "shape": (len(paths), *local_shape)}
                            np.lib.format.write_array_header_1_0(local_file, header)
                    if local.shape[1:] != local_shape:
                        raise ValueError(f"local_features changed shape from {local_shape} to {local.shape[1:]}")
                    if local_file is None:
                        local_chunks.append(local)
                    else:
                        local_file.write(local.astype("<f2", copy=False).tobytes())
                bar.update(len(pixel_values))
    finally:
        model.train(was_training)
    descriptors = np.concatenate(descriptors)
    if cache_dir is None:
        return (descriptors, np.concatenate(local_chunks)) if return_local else descriptors
    with atomic_write_file(global_path) as handle:
        np.save(handle, descriptors)
    return (descriptors, np.load(local_path, mmap_mode="r")) if return_local else descriptors
