"""Files that hloc (cvg/Hierarchical-Localization) reads: global features and retrieval pairs.

* ``global-feats.h5``, as hloc's ``extract_features`` writes it: one group per image *name*
  (the path relative to the image root, ``/``-separated, so ``db/a.jpg`` is group ``db`` holding
  group ``a.jpg``), each with a ``global_descriptor`` dataset ``[D]``, float16 by default (hloc's
  ``as_half``). hloc's ``pairs_from_retrieval`` lists the names as the parents of the datasets.
* ``pairs.txt``, as ``pairs_from_retrieval`` writes it: one ``query_name db_name`` line per
  retrieved pair, best first per query; like hloc, a query is never paired with itself and
  pairs with a negative similarity are dropped. hloc splits lines on whitespace, so names with
  spaces are refused.

Image names are derived from the paths recorded in the index: relative to ``image_root``, by
default the folder the index was built from (``build_report["image_root"]``) or, for an
index that does not record it, the deepest folder holding every image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils import FileKind, atomic_write_file, check_replaceable_file

DESCRIPTOR_DATASET = "global_descriptor"
DTYPES = {"float16": np.float16, "float32": np.float32}
WRITER_ATTRIBUTE = "vprhub"  # root attribute of the files vprhub writes (the --overwrite rule)


def _entry_paths(index, ids: np.ndarray) -> list[Path]:
    paths = []
    for i, row in zip(ids.tolist(), index.metadata(ids)):
        if not row.get("path"):
            raise ValueError(f"index entry {i} records no image path: hloc needs an image name for every entry")
        paths.append(Path(row["path"]))
    return paths


def default_image_root(index) -> Path:
    """The folder the index was built from, or the deepest folder holding every indexed image."""
    recorded = (index.build_report or {}).get("image_root")
    if recorded:
        return Path(recorded)
    paths = _entry_paths(index, index.ids)
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def relative_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """hloc's image name: ``path`` relative to ``root``, ``/``-separated (by path: links are not followed)."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the image root {root}; pass --image-root") from None


def image_names(index, image_root: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """Ids of the index entries and their hloc names (relative to ``image_root``)."""
    ids = index.ids
    root = Path(image_root) if image_root is not None else default_image_root(index)
    names = [relative_name(p, root) for p in _entry_paths(index, ids)]
    if len(set(names)) != len(names):
        seen = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"two index entries have the image name {duplicate!r}")
    return ids, names


def _is_hloc_file(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return WRITER_ATTRIBUTE in handle.attrs
    except OSError:
        return False


HLOC_FILE = FileKind(f"an hloc HDF5 file written by vprhub (root attribute {WRITER_ATTRIBUTE!r})", _is_hloc_file)


def write_global_features(
    index,
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
) -> list[str]:
    """Write every entry of ``index`` (a ``PlaceIndex``) as hloc global features; returns the names."""
    import h5py

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    check_replaceable_file(path, overwrite, HLOC_FILE)
    ids, names = image_names(index, image_root)
    descriptors = index.descriptors(ids).astype(DTYPES[dtype])
    provenance = {"model": (index.identity or {}).get("name_or_path"), "entries": len(names), "dtype": dtype}
    with atomic_write_file(path, "w+b") as handle, h5py.File(handle, "w", libver="latest") as h5:
        h5.attrs[WRITER_ATTRIBUTE] = json.dumps(provenance)
        for name, descriptor in zip(names, descriptors):
            h5.create_group(name).create_dataset(DESCRIPTOR_DATASET, data=descriptor)
    return names


def retrieval_pairs(
    query_names: Sequence[str], hits: Sequence[Sequence[dict]], image_root: str | os.PathLike
) -> list[tuple[str, str]]:
    """``(query_name, db_name)`` pairs from ranked search hits (``metadata["path"]``, ``score``)."""
    pairs = []
    for query, query_hits in zip(query_names, hits):
        for hit in query_hits:
            path = (hit.get("metadata") or {}).get("path")
            if not path:
                raise ValueError(f"index entry {hit.get('index')} records no image path: it has no hloc name")
            name = relative_name(path, image_root)
            if name != query and hit["score"] >= 0:
                pairs.append((query, name))
    bad = next((name for pair in pairs for name in pair if len(name.split()) != 1), None)
    if bad is not None:
        raise ValueError(f"image name {bad!r} holds whitespace: hloc's pairs files cannot represent it")
    return pairs


PAIR_LINE = re.compile(r"\S+\.\w+ \S+\.\w+")  # two image names (with their suffixes)
PAIRS_PROBE_BYTES = 1 << 16


def _is_pairs_file(path: Path) -> bool:
    """Text whose first 64 KiB are ``name.ext name.ext`` lines (an empty file too: no pairs)."""
    with open(path, "rb") as handle:
        head = handle.read(PAIRS_PROBE_BYTES + 1)
    if not head:
        return True
    lines = head[:PAIRS_PROBE_BYTES].split(b"\n")
    if len(head) > PAIRS_PROBE_BYTES or head.endswith(b"\n"):
        lines.pop()  # cut off by the probe, or the empty rest after the last newline
    try:
        return all(PAIR_LINE.fullmatch(line.decode("utf-8")) for line in lines)
    except UnicodeDecodeError:
        return False


PAIRS_FILE = FileKind("a vprhub pairs file (lines of two image names)", _is_pairs_file)


def write_pairs(path: str | os.PathLike, pairs: Sequence[tuple[str, str]]) -> None:
    """One ``query_name db_name`` line per pair (written atomically)."""
    with atomic_write_file(path, "w") as handle:
        handle.writelines(f"{query} {name}\n" for query, name in pairs)


# ---------------------------------------------------------------------------------------- CLI
def add_index_export_command(actions: argparse._SubParsersAction) -> None:
    """``vprhub index export --hloc FILE``."""
    export = actions.add_parser("export", help="write an index's descriptors for other tools (hloc)")
    export.add_argument("--index", required=True, type=Path, help="a .vprindex folder")
    export.add_argument("--hloc", required=True, type=Path, help="hloc global features file to write (.h5)")
    export.add_argument(
        "--image-root", type=Path, help="image names are paths relative to this folder (default: the index's --images)"
    )
    export.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="descriptor dtype (hloc: float16)")
    export.add_argument("--overwrite", action="store_true", help="replace a file that vprhub wrote")
    export.set_defaults(func=index_export_command)


def index_export_command(args: argparse.Namespace) -> int:
    from ..pipelines.index import PlaceIndex

    check_replaceable_file(args.hloc, args.overwrite, HLOC_FILE)  # before loading the index
    index = PlaceIndex.load(args.index)
    names = write_global_features(index, args.hloc, args.image_root, args.dtype, args.overwrite)
    print(f"wrote {len(names)} {args.dtype} global descriptors to {args.hloc} (hloc layout), e.g. {names[0]!r}")
    return 0


def add_pairs_arguments(search: argparse.ArgumentParser) -> None:
    """``vprhub search ... --pairs FILE [--query-root DIR] [--image-root DIR]``."""
    search.add_argument(
        "--pairs", type=Path, help="also write hloc retrieval pairs (query_name db_name) here (see --overwrite)"
    )
    search.add_argument(
        "--query-root", type=Path, help="query names are relative to this folder (default: the queries' common folder)"
    )
    search.add_argument(
        "--image-root", type=Path, help="database names are relative to this folder (default: the index's --images)"
    )


def write_search_pairs(args: argparse.Namespace, index, results: Sequence[Sequence[dict]]) -> None:
    """The ``--pairs`` file of ``vprhub search``."""
    queries = [Path(q).resolve() for q in args.queries]
    query_root = args.query_root or Path(os.path.commonpath([str(q.parent) for q in queries]))
    image_root = args.image_root or default_image_root(index)
    pairs = retrieval_pairs([relative_name(q, query_root) for q in queries], results, image_root)
    write_pairs(args.pairs, pairs)
    print(f"wrote {len(pairs)} retrieval pair{'s' * (len(pairs) != 1)} to {args.pairs}", file=sys.stderr)
