"""GSV-Cities: ``Dataframes/<city>.csv`` (one row per image) and ``Images/<city>/<name>.jpg``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_io import open_image
from .places import PlaceImages

# The city order of the official GSV-Cities loaders (SALAD, CricaVPR): batches follow it.
GSV_CITIES_TRAIN_ORDER = (
    "Bangkok", "BuenosAires", "LosAngeles", "MexicoCity", "OSL", "Rome", "Barcelona", "Chicago", "Madrid", "Miami",
    "Phoenix", "TRT", "Boston", "Lisbon", "Medellin", "Minneapolis", "PRG", "WashingtonDC", "Brussels", "London",
    "Melbourne", "Osaka", "PRS",
)  # fmt: skip
GSV_CITIES_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


def gsv_cities_image_name(row: dict) -> str:
    """File name of one CSV row:
    ``<city>_<place:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg``
    (lat/lon written as Python prints the float).
    """
    place = str(int(row["place_id"]) % 10**5).zfill(7)
    year, month = str(int(row["year"])).zfill(4), str(int(row["month"])).zfill(2)
    northdeg = str(int(float(row["northdeg"]))).zfill(3)
    lat, lon = repr(float(row["lat"])), repr(float(row["lon"]))
    return f"{row['city_id']}_{place}_{year}_{month}_{northdeg}_{lat}_{lon}_{row['panoid']}.jpg"


def gsv_cities_image_path(row: dict) -> str:
    """``<city_id>/<image name>`` of one CSV row, relative to ``Images/``; a ``city_id`` or ``panoid``
    that would lead out of that folder (``..``, a path separator) is refused."""
    city, name = row["city_id"], gsv_cities_image_name(row)
    if city in ("", ".", "..") or any(separator in city + name for separator in "/\\"):
        raise ValueError(
            f"city_id {city!r} and panoid {row['panoid']!r} must be plain names (no '..', '/' or '\\'): "
            "the image would lie outside Images/"
        )
    return f"{city}/{name}"


def is_gsv_cities(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a GSV-Cities root (has ``Dataframes/*.csv``)."""
    return any(Path(path, "Dataframes").glob("*.csv"))


class GSVCities(PlaceImages):
    """Reader for the GSV-Cities layout.

    Args:
        root: folder holding ``Dataframes/`` and ``Images/``.
        cities: city names (CSV stems) to read; all of ``Dataframes/*.csv`` by default, in the
            official order (``GSV_CITIES_TRAIN_ORDER``), other cities after them alphabetically.
        min_images_per_place: places with fewer images are dropped (counted in
            ``dropped_places`` / ``dropped_images`` and logged).

    A place is a ``(city, place_id)`` pair; ``groups`` holds the index of the city (in
    ``cities`` order) of every image.  Image files are only opened when loaded, so a
    missing file surfaces as an unreadable image at training time (skipped and counted there).
    """

    def __init__(self, root: str | os.PathLike, cities: list[str] | None = None, min_images_per_place: int = 4):
        self.root = Path(root)
        frames = self.root / "Dataframes"
        if cities is None:
            found = sorted(p.stem for p in frames.glob("*.csv"))
            official = [city for city in GSV_CITIES_TRAIN_ORDER if city in found]
            cities = official + [city for city in found if city not in official]
        if not cities:
            raise FileNotFoundError(f"{frames}: no <city>.csv files; is {self.root} a GSV-Cities folder?")
        self.name = f"gsv-cities({self.root.name})"
        paths, keys, groups = [], [], []
        for number, city in enumerate(cities):
            csv_path = frames / f"{city}.csv"
            for line, row in enumerate(self._read_csv(csv_path), start=2):  # line 1: the header
                try:
                    paths.append(gsv_cities_image_path(row))
                    keys.append(f"{city}/{int(row['place_id'])}")
                except (ValueError, TypeError) as error:  # TypeError: a short row's missing cells
                    raise ValueError(f"{csv_path} line {line}: {error}") from None
                groups.append(number)
        kept = self._filter_places(np.asarray(keys), min_images_per_place)
        self.paths = np.asarray(paths)[kept]
        self.groups = np.asarray(groups, dtype=np.int64)[kept]
        self.cities = list(cities)

    @staticmethod
    def _read_csv(path: Path) -> list[dict]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: city dataframe not found")
        with open(path, newline="", encoding="utf-8") as handle:
            try:
                reader = csv.DictReader(handle)
                missing = set(GSV_CITIES_COLUMNS) - set(reader.fieldnames or ())
                if missing:
                    raise ValueError(
                        f"{path}: missing columns {sorted(missing)} (expected {list(GSV_CITIES_COLUMNS)})"
                    )
                return list(reader)
            except (UnicodeDecodeError, csv.Error) as error:
                raise ValueError(f"{path}: unreadable as a UTF-8 CSV file ({error})") from None

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.root / "Images" / self.paths[index])
