"""Resolve a benchmark name under a data root, or a folder path, to the right reader.

Under ``root`` a name is looked for, in this order, as

1. the SALAD/MixVPR image lists: ``<root>/<folder>/<prefix>_dbImages.npy`` (the ``.npy`` files
   from SALAD's ``datasets/<X>/`` copied into the image folder the lists are relative to);
2. MSLS in its own layout (``msls_val`` only): ``<root>/{mapillary,mapillary_sls,msls}/train_val``;
3. the @UTM layout of the geo-localization benchmark: ``<root>/<base>/images/<split>``, where
   ``<base>_<split>`` names the split (``pitts30k_val``) and a bare ``<base>`` means ``test``
   (or ``<root>/images/<split>`` when the root is the ``<base>`` folder itself).

A path (anything with a ``/``, or any ``dataset`` when no root is given; a name not found
under the root falls back to an existing path of that name) is read by what it holds:
``database/`` + ``queries/`` (@UTM layout), ``images/<split>/`` (a dataset folder of that layout:
its ``test`` split, or its only split), ``train_val/`` (MSLS), or ``<prefix>_dbImages.npy`` lists
(give the ``.npy`` file when a folder holds several).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .geo_folder import read_geo_folder
from .msls import MSLS_VAL_CITIES, read_msls
from .npy_lists import list_prefixes, read_npy_lists
from .testset import DEFAULT_POSITIVE_RADIUS, VPRTestSet

# name -> (image folder under the root, list prefix); folder names are those of SALAD's readers
NPY_BENCHMARKS = {
    "nordland": ("Nordland", "Nordland"),
    "sped": ("SPEDTEST", "SPED"),
    "pitts30k_test": ("Pittsburgh", "pitts30k_test"),
    "pitts30k_val": ("Pittsburgh", "pitts30k_val"),
    "pitts250k_test": ("Pittsburgh", "pitts250k_test"),
    "msls_val": ("mapillary", "msls_val"),
}
MSLS_FOLDERS = ("mapillary", "mapillary_sls", "msls")
GEO_BENCHMARKS = ("pitts30k", "pitts250k", "tokyo247", "msls", "st_lucia", "sf_xl")
SPLITS = ("train", "val", "test")
KNOWN_BENCHMARKS = tuple(sorted(set(NPY_BENCHMARKS) | set(GEO_BENCHMARKS)))


def _geo_folders(root: Path, name: str) -> list[Path]:
    """``<root>/<base>/images/<split>``, and ``<root>/images/<split>`` when the root is that dataset's folder."""
    base, _, split = name.rpartition("_")
    if not base or split not in SPLITS:
        base, split = name, "test"
    folders = [root / base / "images" / split]
    if root.name.lower() == base:
        folders.append(root / "images" / split)
    return folders


def _candidates(root: Path, name: str, radius: float) -> list[tuple[Path, Callable[[], VPRTestSet]]]:
    """(path that must exist, reader) pairs for a benchmark name, in resolution order."""
    candidates = []
    if name in NPY_BENCHMARKS:
        folder, prefix = NPY_BENCHMARKS[name]
        lists = root / folder
        candidates.append((lists / f"{prefix}_dbImages.npy", partial(read_npy_lists, lists, prefix, name=name)))
    if name == "msls_val":
        for folder in MSLS_FOLDERS:
            candidates.append(
                (root / folder / "train_val", partial(read_msls, root / folder, MSLS_VAL_CITIES, name, radius))
            )
    for geo in _geo_folders(root, name):
        candidates.append((geo, partial(read_geo_folder, geo, name, radius)))
    return candidates


def _read_path(path: Path, name: str, radius: float) -> VPRTestSet:
    if path.is_file() and path.name.endswith("_dbImages.npy"):
        return read_npy_lists(path.parent, path.name[: -len("_dbImages.npy")], name=name)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    if (path / "database").is_dir() and (path / "queries").is_dir():
        return read_geo_folder(path, name, radius)
    splits = [split for split in SPLITS if (path / "images" / split / "database").is_dir()]
    if splits:
        if "test" not in splits and len(splits) > 1:
            example = path / "images" / splits[0]
            raise ValueError(f"{path} holds the splits {splits}; pass the one to evaluate, e.g. {example}")
        return read_geo_folder(path / "images" / ("test" if "test" in splits else splits[0]), name, radius)
    if (path / "train_val").is_dir():
        return read_msls(path, MSLS_VAL_CITIES, name, radius)
    prefixes = list_prefixes(path)
    if len(prefixes) == 1:
        return read_npy_lists(path, prefixes[0], name=name)
    if prefixes:
        raise ValueError(
            f"{path} holds several image lists ({', '.join(prefixes)}); pass the "
            f"<prefix>_dbImages.npy file of the one to evaluate"
        )
    raise ValueError(
        f"{path} is not a known dataset layout: expected database/ and queries/ (@UTM file names), "
        "train_val/ (MSLS) or <prefix>_dbImages.npy lists"
    )


def load_test_set(
    dataset: str | os.PathLike,
    root: str | os.PathLike | None = None,
    radius: float = DEFAULT_POSITIVE_RADIUS,
) -> VPRTestSet:
    """A benchmark name under ``root`` (see the module docstring) or a dataset path.

    ``radius`` (metres) applies to the layouts that derive positives from coordinates.
    """
    text = os.fspath(dataset)
    path = Path(text).expanduser()
    if root is None or os.sep in text:
        if not path.exists() and root is None and os.sep not in text:
            raise FileNotFoundError(f"dataset {text!r} is not an existing path; a benchmark name needs --root (the folder holding the datasets)")
        return _read_path(path, text, radius)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    candidates = _candidates(root, text.lower(), radius)
    for required, reader in candidates:
        if required.exists():
            return reader()
    if path.exists():
        return _read_path(path, text, radius)
    tried = "\n  ".join(str(required) for required, _ in candidates)
    raise FileNotFoundError(f"dataset {text!r} not found under {root}; looked for:\n  {tried}")
