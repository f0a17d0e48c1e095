"""Reader for the image lists shipped with the SALAD / MixVPR / GSV-Cities evaluation code.

``<prefix>_dbImages.npy`` and ``<prefix>_qImages.npy`` hold image paths relative to the
dataset's image folder; positives come from ``<prefix>_gt.npy`` (one index array per query:
Nordland, SPED, Pittsburgh) or, for MSLS val, from ``<prefix>_qIdx.npy`` (the evaluated rows
of ``qImages``) with ``<prefix>_pIdx.npy`` (their positives). The ground-truth files are
pickled object arrays (one index array per query): they are read by a restricted unpickler
that builds numpy arrays of numbers and strings and refuses anything else, so no code from
a data file ever runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .testset import VPRTestSet, check_images_exist


def _numpy_multiarray_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray  # numpy >= 2; files written by numpy 1 name ``numpy.core``

    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    modules = ("numpy._core.multiarray", "numpy.core.multiarray")
    return {(module, name): obj for module in modules for name, obj in found.items()}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays (and numbers, strings) only: every other global is refused."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, **_numpy_multiarray_globals()}

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which is not part of a numpy array of numbers or strings"
            ) from None


_SAFE_KINDS = "biufUS"  # bool, int, unsigned, float, unicode, bytes


def _check_content(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is numbers / strings / arrays of them, nested."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            for item in value.ravel().tolist():
                _check_content(item)
        elif value.dtype.kind not in _SAFE_KINDS or value.dtype.fields is not None:
            raise ValueError(f"an array of {value.dtype}")
    elif isinstance(value, np.generic):
        if value.dtype.kind not in _SAFE_KINDS:
            raise ValueError(f"a {value.dtype} scalar")
    elif not isinstance(value, (bool, int, float, str, bytes)):
        raise ValueError(f"a {type(value).__name__}")


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load`` for data files: plain arrays as usual, object arrays through a restricted unpickler.

    An object array may hold numbers, strings and arrays of them (the layout of the released
    ground-truth files); any other pickled content raises ``ValueError`` without being run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            version = npy_format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            if not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            try:
                array = _ArrayUnpickler(handle, encoding="latin1").load()
            except pickle.UnpicklingError as error:
                raise ValueError(f"refusing its pickled content: {error}") from None
            except (EOFError, TypeError, AttributeError, IndexError, KeyError) as error:
                raise ValueError(f"its pickled content is damaged ({type(error).__name__}: {error})") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npy file of numbers or strings: {error}") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ValueError(f"{path} does not hold the {list(shape)} array its header announces")
    try:
        _check_content(array)
    except ValueError as error:
        raise ValueError(f"{path} holds {error}, not numbers or strings") from None
    return array


def _image_list(path: Path) -> list[str]:
    array = load_npy(path)
    if array.ndim != 1 or not all(isinstance(item, str) for item in array.tolist()):
        raise ValueError(f"{path} must be a 1-D array of relative image paths, got {array.dtype} {list(array.shape)}")
    return array.tolist()


def _positives(path: Path, expected: int) -> list[np.ndarray]:
    array = load_npy(path)
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
        q_idx = load_npy(folder / f"{prefix}_qIdx.npy")
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
