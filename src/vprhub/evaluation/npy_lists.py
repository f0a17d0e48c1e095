"""Reader for the image lists shipped with the SALAD / MixVPR / GSV-Cities evaluation code.

``<prefix>_dbImages.npy`` and ``<prefix>_qImages.npy`` hold image paths relative to the
dataset's image folder; positives come from ``<prefix>_gt.npy`` (one index array per query:
Nordland, SPED, Pittsburgh) or, for MSLS val, from ``<prefix>_qIdx.npy`` (the evaluated rows
of ``qImages``) with ``<prefix>_pIdx.npy`` (their positives). The ground-truth files are
pickled object arrays: load only files you trust.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .testset import VPRTestSet, check_images_exist


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image list file {path} does not exist")
    try:
        return np.load(path, allow_pickle=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npy file: {error}") from None


def _image_list(path: Path) -> list[str]:
    array = _load(path)
    if array.ndim != 1 or not all(isinstance(item, str) for item in array.tolist()):
        raise ValueError(f"{path} must be a 1-D array of relative image paths, got {array.dtype} {list(array.shape)}")
    return array.tolist()


def _positives(path: Path, expected: int) -> list[np.ndarray]:
    array = _load(path)
    if len(array) != expected:
        raise ValueError(f"{path} has ground truth for {len(array)} queries, expected {expected}")
    positives = []
    for i, entry in enumerate(array):
        entry = np.asarray(entry)
        if entry.size and not np.issubdtype(entry.dtype, np.integer):
            raise ValueError(f"{path}: entry {i} is not a list of database indices ({entry.dtype})")
        positives.append(entry.astype(np.int64).ravel())
    return positives


def list_prefixes(folder: str | os.PathLike) -> list[str]:
    """Prefixes of the ``<prefix>_dbImages.npy`` lists in ``folder``."""
    return sorted(p.name[: -len("_dbImages.npy")] for p in Path(folder).glob("*_dbImages.npy"))


def read_npy_lists(
    folder: str | os.PathLike,
    prefix: str,
    images_root: str | os.PathLike | None = None,
    name: str | None = None,
) -> VPRTestSet:
    """Read ``folder/<prefix>_*.npy``; image paths are relative to ``images_root`` (default ``folder``)."""
    folder = Path(folder)
    images_root = Path(images_root) if images_root is not None else folder
    database = _image_list(folder / f"{prefix}_dbImages.npy")
    queries = _image_list(folder / f"{prefix}_qImages.npy")
    if (folder / f"{prefix}_gt.npy").is_file() or not (folder / f"{prefix}_qIdx.npy").is_file():
        positives = _positives(folder / f"{prefix}_gt.npy", len(queries))
    else:
        q_idx = _load(folder / f"{prefix}_qIdx.npy")
        if (
            q_idx.ndim != 1
            or not np.issubdtype(q_idx.dtype, np.integer)
            or (q_idx.size and (q_idx.min() < 0 or q_idx.max() >= len(queries)))
        ):
            raise ValueError(
                f"{folder / f'{prefix}_qIdx.npy'} must be 1-D integer rows of the {len(queries)} query images"
            )
        queries = [queries[i] for i in q_idx]
        positives = _positives(folder / f"{prefix}_pIdx.npy", len(queries))
    database_paths = [images_root / p for p in database]
    query_paths = [images_root / p for p in queries]
    check_images_exist(database_paths + query_paths, f"{folder / prefix}_*.npy")
    return VPRTestSet(name or prefix, database_paths, query_paths, positives)
