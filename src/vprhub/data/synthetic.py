"""Synthetic places: procedural street scenes, each seen from several viewpoints.

Every place is a scene drawn from its own seed (sky, a skyline of textured facades,
ground, a few coloured signs).  A *view* of the place crops the scene through a random
perspective warp (viewpoint and scale), changes the illumination (brightness, contrast,
colour cast) and may add occluders.  Everything is a pure function of
``(seed, place, view)``, so a dataset is reproducible anywhere without files.

Places sit on a fake UTM grid: views of one place lie within ``view_radius_m`` of its
centre and different places are at least ``grid_spacing_m - 2 * place_jitter_m`` apart,
so the usual 25 m positive radius separates places exactly.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils import FolderKind, atomic_write_dir, holds_only
from .gsv_cities import GSV_CITIES_COLUMNS, gsv_cities_image_name
from .places import PlaceImages

UTM_ORIGIN = (500_000.0, 4_500_000.0)
UTM_ZONE = ("33", "T")
SYNTHETIC_MARKER = "vprhub-synthetic.txt"  # lets ``overwrite=True`` recognise a generated dataset
SYNTHETIC_FILES = re.compile(rf"{re.escape(SYNTHETIC_MARKER)}|images|Images|Dataframes")
SYNTHETIC_DATASET = FolderKind(
    f"a vprhub synthetic dataset ({SYNTHETIC_MARKER})",
    lambda path: (path / SYNTHETIC_MARKER).is_file() and holds_only(path, SYNTHETIC_FILES),
)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _vertical_gradient(height: int, width: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()


def _draw_scene(place_seed: tuple[int, ...], size: int) -> Image.Image:
    """Render the scene of one place on a ``size`` x ``size`` RGB canvas."""
    rng = _rng(*place_seed)
    canvas = _vertical_gradient(size, size, rng.uniform(60, 255, 3), rng.uniform(120, 255, 3))
    horizon = int(size * rng.uniform(0.55, 0.75))
    canvas[horizon:] = _vertical_gradient(size - horizon, size, rng.uniform(20, 140, 3), rng.uniform(40, 200, 3))

    yy, xx = np.mgrid[0:size, 0:size]
    edges = np.sort(rng.uniform(0, 1, rng.integers(4, 9)))
    edges = np.round(np.concatenate([[0.0], edges, [1.0]]) * size).astype(int)
    for x0, x1 in zip(edges[:-1], edges[1:], strict=True):
        if x1 - x0 < 2 or rng.random() < 0.15:  # a gap in the skyline
            continue
        top = int(size * rng.uniform(0.08, 0.5))
        wall, window = rng.uniform(30, 230, 3), rng.uniform(0, 255, 3)
        period_x, period_y = (max(2, int(size * p)) for p in rng.uniform(0.03, 0.09, 2))
        fill_x, fill_y = rng.uniform(0.35, 0.75, 2)
        block = (slice(top, horizon), slice(x0, x1))
        lit = ((xx[block] - x0) % period_x < fill_x * period_x) & ((yy[block] - top) % period_y < fill_y * period_y)
        canvas[block] = np.where(lit[..., None], window, wall)

    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):  # signs, murals, trees
        center, radius = rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0.04, 0.12) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([*(center - radius), *(center + radius)], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))
            points = center + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            draw.polygon([tuple(p) for p in points], fill=colour)
    return image


def _perspective_coefficients(source: np.ndarray, target: np.ndarray) -> tuple[float, ...]:
    """PIL ``PERSPECTIVE`` coefficients mapping output corners ``target`` to canvas points ``source``."""
    rows = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return tuple(np.linalg.solve(np.asarray(rows, dtype=np.float64), source.reshape(-1)))


class SyntheticPlaces(PlaceImages):
    """Procedural places, ``views_per_place`` images each; item ``i`` is a dict
    ``{"image": PIL.Image, "place_id": int, "view": int, "utm": (east, north)}``.

    Args:
        num_places: number of distinct places.
        views_per_place: images of each place (different viewpoint, scale, light, occluders).
        image_size: output ``(height, width)`` or one int for square images.
        seed: selects the scenes; two seeds give unrelated places.
        first_view: index of the first view (database and query views of the same places
            use disjoint view ranges).
        max_occluders: up to this many occluding shapes per view.
        difficulty: scales the viewpoint and illumination changes between views (0: every
            view is the same crop under the same light; 1: the default ranges).
        grid_spacing_m, place_jitter_m, view_radius_m: fake UTM layout (metres).
    """

    canvas_scale = 1.6

    def __init__(
        self,
        num_places: int = 100,
        views_per_place: int = 4,
        image_size: int | tuple[int, int] = 224,
        seed: int = 0,
        first_view: int = 0,
        max_occluders: int = 3,
        difficulty: float = 1.0,
        grid_spacing_m: float = 150.0,
        place_jitter_m: float = 20.0,
        view_radius_m: float = 3.0,
    ):
        if num_places < 1 or views_per_place < 1:
            raise ValueError(f"need num_places >= 1 and views_per_place >= 1, got {num_places} and {views_per_place}")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(self.image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        self.views_per_place = views_per_place
        self.seed, self.first_view, self.max_occluders, self.difficulty = seed, first_view, max_occluders, difficulty
        self.name = f"synthetic(seed={seed})"
        self.labels = np.repeat(np.arange(num_places, dtype=np.int64), views_per_place)
        self.utm = self._utm(grid_spacing_m, place_jitter_m, view_radius_m)
        self._scene = functools.lru_cache(maxsize=64)(self._render_scene)

    def _utm(self, spacing: float, jitter: float, radius: float) -> np.ndarray:
        columns = int(np.ceil(np.sqrt(self.num_places)))
        place = np.arange(self.num_places)
        centres = np.stack([place % columns, place // columns], axis=1) * spacing + np.asarray(UTM_ORIGIN)
        centres += _rng(self.seed, 1).uniform(-jitter, jitter, centres.shape)
        views = np.arange(self.first_view, self.first_view + self.views_per_place)
        offsets = np.stack([_rng(self.seed, p, v, 2).uniform(-1, 1, 2) for p in place for v in views])
        offsets *= radius / np.sqrt(2)  # inside the disc of radius ``radius``
        return np.repeat(centres, self.views_per_place, axis=0) + offsets

    def load_image(self, index: int) -> Image.Image:
        place, view = divmod(int(index), self.views_per_place)
        return self.render(place, self.first_view + view)

    def __getitem__(self, index: int) -> dict:
        view = self.first_view + int(index) % self.views_per_place
        return {**super().__getitem__(index), "view": view, "utm": tuple(self.utm[index])}

    def _render_scene(self, place: int) -> Image.Image:
        return _draw_scene((self.seed, place, 0), round(self.canvas_scale * max(self.image_size)))

    def __getstate__(self) -> dict:  # the scene cache stays behind (DataLoader workers under spawn)
        return {key: value for key, value in self.__dict__.items() if key != "_scene"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scene = functools.lru_cache(maxsize=64)(self._render_scene)

    def render(self, place: int, view: int) -> Image.Image:
        """Image of ``place`` from viewpoint number ``view`` (any non-negative int)."""
        if not 0 <= place < self.num_places:
            raise IndexError(f"place {place} out of range [0, {self.num_places})")
        scene = self._scene(place)
        rng = _rng(self.seed, place, view, 3)
        height, width = self.image_size
        side = scene.width

        # Viewpoint and scale: a square crop of the canvas, moved, zoomed, tilted, corners jittered.
        d = self.difficulty
        extent = side / self.canvas_scale * (1 + d * rng.uniform(-0.25, 0.15)) / 2
        centre = side / 2 + d * rng.uniform(-0.12, 0.12, 2) * side
        angle = d * rng.uniform(-0.08, 0.08)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        source = centre + (unit * extent) @ rotation.T + d * rng.uniform(-0.08, 0.08, (4, 2)) * extent
        target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
        image = scene.transform(
            (width, height), Image.Transform.PERSPECTIVE, _perspective_coefficients(source, target), Image.BILINEAR
        )

        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(0, self.max_occluders + 1)):  # passers-by, cars, poles
            w, h = rng.uniform(0.06, 0.3, 2) * (width, height)
            x, y = rng.uniform(0, 1, 2) * (width - w, height - h)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

        # Illumination as one lookup table per channel: contrast around the mean, brightness,
        # colour cast, gamma.
        mean = np.asarray(image, dtype=np.float32).mean() / 255.0
        levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :]
        levels = (levels - mean) * (1 + d * rng.uniform(-0.4, 0.3)) + mean
        levels = levels * (1 + d * rng.uniform(-0.4, 0.4)) * (1 + d * rng.uniform(-0.2, 0.2, (3, 1)))
        levels = levels.clip(0, 1) ** np.exp(d * rng.uniform(np.log(0.7), np.log(1.4)))
        return image.point((levels * 255 + 0.5).astype(np.uint8).reshape(-1).tolist())

    def to_hf_dataset(self):
        """The images as a ``datasets.Dataset`` (columns image, place_id, view, utm_east, utm_north)."""
        import datasets

        features = datasets.Features(
            {
                "image": datasets.Image(),
                "place_id": datasets.Value("int64"),
                "view": datasets.Value("int64"),
                "utm_east": datasets.Value("float64"),
                "utm_north": datasets.Value("float64"),
            }
        )
        items = [self[i] for i in range(len(self))]
        columns = {
            "image": [item["image"] for item in items],
            "place_id": self.labels.tolist(),
            "view": [item["view"] for item in items],
            "utm_east": self.utm[:, 0].tolist(),
            "utm_north": self.utm[:, 1].tolist(),
        }
        return datasets.Dataset.from_dict(columns, features=features)

    def gmberton_name(self, index: int) -> str:
        """File name in the gmberton ``@east@north@zone@letter@lat@lon@panoid@...@.jpg`` convention."""
        place, view = divmod(index, self.views_per_place)
        east, north = self.utm[index]
        panoid = f"s{self.seed}p{place:06d}v{self.first_view + view:03d}"
        return f"@{east:.2f}@{north:.2f}@{UTM_ZONE[0]}@{UTM_ZONE[1]}@@@{panoid}@@@@@@@@.jpg"

    def save_images(self, folder: str | os.PathLike, quality: int = 90) -> list[Path]:
        """Write every image into ``folder`` under its gmberton name; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index in range(len(self)):
            path = folder / self.gmberton_name(index)
            self[index]["image"].save(path, quality=quality)
            paths.append(path)
        return paths


def write_gmberton_benchmark(
    root: str | os.PathLike,
    num_places: int = 50,
    database_views: int = 1,
    query_views: int = 1,
    image_size: int | tuple[int, int] = 224,
    seed: int = 1,
    split: str = "test",
    difficulty: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a benchmark in the gmberton layout: ``root/images/<split>/{database,queries}/@east@north@...@.jpg``.

    Database and queries show the same places from disjoint viewpoints (views
    ``[0, database_views)`` and ``[database_views, database_views + query_views)``).
    """
    database = SyntheticPlaces(num_places, database_views, image_size, seed, difficulty=difficulty)
    queries = SyntheticPlaces(
        num_places, query_views, image_size, seed, first_view=database_views, difficulty=difficulty
    )
    with atomic_write_dir(root, overwrite=overwrite, kind=SYNTHETIC_DATASET) as tmp:
        (tmp / SYNTHETIC_MARKER).write_text("generated by vprhub.data.write_gmberton_benchmark\n")
        database.save_images(tmp / "images" / split / "database")
        queries.save_images(tmp / "images" / split / "queries")
    return Path(root)


def write_gsv_cities(
    root: str | os.PathLike,
    cities: dict[str, int] | None = None,
    views_per_place: int = 4,
    image_size: int | tuple[int, int] = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write synthetic places in the GSV-Cities layout (``Dataframes/<city>.csv`` + ``Images/<city>/``).

    ``cities`` maps a city name to its number of places (default ``{"Synthetic": 20}``);
    each city gets its own scenes.
    """
    cities = {"Synthetic": 20} if cities is None else cities
    with atomic_write_dir(root, overwrite=overwrite, kind=SYNTHETIC_DATASET) as tmp:
        (tmp / SYNTHETIC_MARKER).write_text("generated by vprhub.data.write_gsv_cities\n")
        for number, (city, num_places) in enumerate(cities.items()):
            places = SyntheticPlaces(num_places, views_per_place, image_size, seed=seed * 1000 + number)
            (tmp / "Images" / city).mkdir(parents=True)
            (tmp / "Dataframes").mkdir(exist_ok=True)
            rows = []
            for index in range(len(places)):
                place, view = divmod(index, views_per_place)
                east, north = places.utm[index] - np.asarray(UTM_ORIGIN)
                row = {
                    "place_id": place,
                    "year": 2010 + view % 12,
                    "month": 1 + view % 12,
                    "northdeg": (37 * view) % 360,
                    "city_id": city,
                    "lat": round(45.0 + north / 111_320.0, 6),
                    "lon": round(9.0 + east / 78_710.0, 6),
                    "panoid": f"pano{number:02d}{place:06d}{view:03d}",
                }
                rows.append(row)
                places[index]["image"].save(tmp / "Images" / city / gsv_cities_image_name(row), quality=90)
            with open(tmp / "Dataframes" / f"{city}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=GSV_CITIES_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    return Path(root)
