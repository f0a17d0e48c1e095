"""Reader for the deep-visual-geo-localization layout (its dataset downloader writes it).

``<folder>/database/**/*.jpg`` and ``<folder>/queries/**/*.jpg``, each file named
``@UTM_east@UTM_north@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@time@note@.jpg``
(only the two UTM fields are required). Extensions ``.jpg``, ``.jpeg`` and ``.png`` count in any
case (``.JPG``); hidden files are ignored. Linked folders are followed once each, so a symlink
loop cannot list an image twice. Images are taken in sorted path order; positives are the
database images within 25 m of the query.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .testset import DEFAULT_POSITIVE_RADIUS, VPRTestSet, radius_positives

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_utm(path: str | os.PathLike) -> tuple[float, float]:
    """(easting, northing) from an ``@UTM_east@UTM_north@...`` file name; ``ValueError`` if malformed."""
    fields = Path(path).name.split("@")
    try:
        if len(fields) < 3:
            raise ValueError
        easting, northing = float(fields[1]), float(fields[2])
    except ValueError:
        raise ValueError(
            f"{path}: the file name does not start with '@UTM_east@UTM_north@' (expected e.g. "
            "'@0585000.12@4477000.34@17@T@...@.jpg')"
        ) from None
    if not (np.isfinite(easting) and np.isfinite(northing)):
        raise ValueError(f"{path}: UTM coordinates in the file name are not finite")
    return easting, northing


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (see the module docstring), in sorted path order."""
    seen, paths = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:  # reached again through a link: a loop or a duplicate
            dirs.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths.extend(
            os.path.join(root, name)
            for name in names
            if not name.startswith(".")
            and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            and os.path.isfile(os.path.join(root, name))
        )
    return [Path(p) for p in sorted(paths)]


def _images_and_utm(folder: Path) -> tuple[list[Path], np.ndarray]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, any case)")
    utm, bad = [], []
    for path in paths:
        try:
            utm.append(parse_utm(path))
        except ValueError as error:
            bad.append(str(error))
    if bad:
        raise ValueError(f"{len(bad)} of {len(paths)} file names in {folder} are malformed; first: {bad[0]}")
    return paths, np.asarray(utm, dtype=np.float64)


def read_geo_folder(
    folder: str | os.PathLike,
    name: str | None = None,
    radius: float = DEFAULT_POSITIVE_RADIUS,
    database_dir: str = "database",
    queries_dir: str = "queries",
) -> VPRTestSet:
    """Read ``folder/{database_dir,queries_dir}`` in the @UTM naming; positives within ``radius`` metres."""
    folder = Path(folder)
    database_paths, database_utm = _images_and_utm(folder / database_dir)
    query_paths, query_utm = _images_and_utm(folder / queries_dir)
    positives = radius_positives(database_utm, query_utm, radius)
    return VPRTestSet(name or folder.name, database_paths, query_paths, positives)
