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

import math
import os
import pickle
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .testset import VPRTestSet, check_images_exist


def _multiarray(name: str):
    from numpy._core import multiarray  # numpy >= 2; files written by numpy 1 name ``numpy.core``

    return getattr(multiarray, name)


class _LoadedArray(np.ndarray):
    """What ``numpy.ndarray`` means in a data file: built only through ``_reconstruct`` (as numpy's
    own pickles do), with an object array's items checked against its shape (numpy reads past
    a short item list and crashes)."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("it calls numpy.ndarray directly, which numpy's own pickles never do")

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) in (4, 5):
            shape, dtype, _, items = state[-4:]
            if isinstance(dtype, np.dtype) and dtype.hasobject:
                count = math.prod(shape)
                if dtype != np.dtype(object) or not isinstance(items, list) or len(items) != count:
                    raise pickle.UnpicklingError(f"an object array of {count} items does not carry them")
        super().__setstate__(state)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays (and numbers, strings) of at most ``max_bytes``: every other global is refused."""

    def __init__(self, handle, max_bytes: int) -> None:
        super().__init__(handle, encoding="latin1")
        self.max_bytes = max_bytes
        scalar = _multiarray("scalar")
        self.allowed = {("numpy", "ndarray"): _LoadedArray, ("numpy", "dtype"): np.dtype}
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            self.allowed.update({(module, "_reconstruct"): self._reconstruct, (module, "scalar"): scalar})

    def _reconstruct(self, subtype, shape, dtype) -> np.ndarray:
        if subtype is not _LoadedArray:
            raise pickle.UnpicklingError(f"it rebuilds a {subtype!r}, not a numpy array")
        _check_fits(shape, np.dtype(dtype), self.max_bytes)
        return _multiarray("_reconstruct")(_LoadedArray, shape, dtype)

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which is not part of a numpy array of numbers or strings"
            ) from None


def _check_fits(shape, dtype: np.dtype, available: int) -> None:
    """``ValueError`` unless a ``shape`` array of ``dtype`` fits in ``available`` bytes of file
    (an object array's items take at least a byte each)."""
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    needed = count * (1 if dtype.hasobject else dtype.itemsize)
    if needed > available:
        raise ValueError(
            f"it announces a {list(shape) if isinstance(shape, tuple) else [count]} {dtype} array "
            f"(at least {needed} bytes) but holds only {available} bytes of data"
        )


_SAFE_KINDS = "biufUS"  # bool, int, unsigned, float, unicode, bytes
MAX_NESTING = 16  # object arrays inside object arrays (ground truth nests 2 deep)


def _check_content(value: object, depth: int = 0) -> None:
    """Raise ``ValueError`` unless ``value`` is numbers / strings / arrays of them, nested at most
    ``MAX_NESTING`` object arrays deep."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            if depth == MAX_NESTING:
                raise ValueError(f"object arrays nested more than {MAX_NESTING} deep")
            for item in value.ravel().tolist():
                _check_content(item, depth + 1)
        elif value.dtype.kind not in _SAFE_KINDS or value.dtype.fields is not None:
            raise ValueError(f"an array of {value.dtype}")
    elif isinstance(value, np.generic):
        if value.dtype.kind not in _SAFE_KINDS:
            raise ValueError(f"a {value.dtype} scalar")
    elif not isinstance(value, (bool, int, float, str, bytes)):
        raise ValueError(f"a {type(value).__name__}")


def _plain(array: np.ndarray) -> np.ndarray:
    """``array`` and the arrays it holds as plain ``numpy.ndarray`` (not :class:`_LoadedArray`)."""
    array = array.view(np.ndarray)
    if array.dtype.hasobject:
        for index in np.ndindex(array.shape):
            if isinstance(array[index], np.ndarray):
                array[index] = _plain(array[index])
    return array


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load`` for data files: plain arrays as usual, object arrays through a restricted unpickler.

    An object array may hold numbers, strings and arrays of them (the layout of the released
    ground-truth files); any other pickled content raises ``ValueError`` without being run, and
    so does an array larger than the file could hold (nothing that size is allocated).
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
            available = path.stat().st_size - handle.tell()
            _check_fits(shape, dtype, available)
            if not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            try:
                array = _ArrayUnpickler(handle, available).load()
            except pickle.UnpicklingError as error:
                raise ValueError(f"refusing its pickled content: {error}") from None
            except (EOFError, TypeError, AttributeError, IndexError, KeyError) as error:
                raise ValueError(f"its pickled content is damaged ({type(error).__name__}: {error})") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npy file of numbers or strings: {error}") from None
    except MemoryError:
        raise ValueError(f"{path} is not a readable .npy file: its arrays do not fit in memory") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ValueError(f"{path} does not hold the {list(shape)} array its header announces")
    try:
        _check_content(array)
    except ValueError as error:
        raise ValueError(f"{path} holds {error}, not numbers or strings") from None
    return _plain(array)


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


def _repeated(paths: list[str]) -> tuple[str, int] | None:
    """The first path listed more than once (spellings of one file count as one) and how many paths are repeats."""
    counts = Counter(os.path.normpath(p) for p in paths)
    repeats = sum(count - 1 for count in counts.values())
    first = next((p for p in paths if counts[os.path.normpath(p)] > 1), None)
    return None if first is None else (first, repeats)


def _check_unique(database: list[str], queries: list[str], where: str) -> None:
    """A database image listed twice changes recall@K (its copies fill the top K): ``ValueError``.
    A query listed twice is warned about and counted twice, as the official evaluation does."""
    if repeated := _repeated(database):
        first, count = repeated
        raise ValueError(
            f"{where}_dbImages.npy lists database images more than once ({count} repeats, first {first!r}); "
            "repeats change recall@K: list each image once"
        )
    if repeated := _repeated(queries):
        first, count = repeated
        warnings.warn(
            f"{where}_qImages.npy: queries evaluated more than once ({count} repeats, first {first!r}); each counts as often as listed"
        )


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
    _check_unique(database, queries, str(folder / prefix))
    database_paths = [images_root / p for p in database]
    query_paths = [images_root / p for p in queries]
    check_images_exist(database_paths + query_paths, f"{folder / prefix}_*.npy")
    return VPRTestSet(name or prefix, database_paths, query_paths, positives)
