"""Any ``datasets.Dataset`` with an image column and a place-label column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_io import UnreadableImageError, open_image
from .places import PlaceImages

LABEL_COLUMN_CANDIDATES = ("place_id", "place", "label", "labels")


def _find_image_column(dataset) -> str:
    import datasets

    names = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not names:
        raise ValueError(f"no image column among {list(dataset.features)}; pass image_column=")
    return names[0]


def _find_label_column(dataset) -> str:
    import datasets

    for name in LABEL_COLUMN_CANDIDATES:
        if name in dataset.features:
            return name
    names = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)]
    if not names:
        raise ValueError(
            f"no place-label column among {list(dataset.features)} "
            f"(looked for {list(LABEL_COLUMN_CANDIDATES)} or a ClassLabel); pass label_column="
        )
    return names[0]


class HFPlaces(PlaceImages):
    """Places from a ``datasets.Dataset``.

    Args:
        dataset: the dataset (one split).
        image_column: a ``datasets.Image`` column or a column of file paths; found
            automatically when there is one image column.
        label_column: place labels (ints or strings); ``place_id``, ``place``, ``label``,
            ``labels`` or the first ``ClassLabel`` column by default.
        min_images_per_place: places with fewer images are dropped and counted.
        name: shown in logs and results.

    Images are decoded lazily with PIL, so a corrupt one raises only when it is loaded
    (the training loader skips and counts it).
    """

    def __init__(
        self,
        dataset,
        image_column: str | None = None,
        label_column: str | None = None,
        min_images_per_place: int = 1,
        name: str = "hf-dataset",
    ):
        import datasets

        self.name = name
        image_column = image_column or _find_image_column(dataset)
        label_column = label_column or _find_label_column(dataset)
        for column in (image_column, label_column):
            if column not in dataset.features:
                raise ValueError(f"{name}: no column {column!r}; columns are {list(dataset.features)}")
        labels = np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column])
        kept = self._filter_places(labels, min_images_per_place)
        images = dataset.select_columns([image_column])
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        self.images = images.select(kept) if len(kept) < len(dataset) else images
        self.image_column = image_column

    def load_image(self, index: int) -> Image.Image:
        value = self.images[int(index)][self.image_column]
        if isinstance(value, str):
            return open_image(value)
        if isinstance(value, dict) and value.get("bytes") is not None:
            return open_image(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            return open_image(value["path"])
        raise UnreadableImageError(f"{self.name}: image {index} has neither bytes nor a path")


def load_hf_places(
    source: str | os.PathLike,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    min_images_per_place: int = 1,
) -> HFPlaces:
    """Open a saved dataset folder (``save_to_disk``), an image folder (one sub-folder per
    place, read with ``imagefolder``) or a Hub dataset id, and wrap ``split`` as ``HFPlaces``.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
    elif path.is_dir():
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        dataset = datasets.load_dataset(str(source))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source}: no split {split!r}; splits are {list(dataset)}")
        dataset = dataset[split]
    return HFPlaces(dataset, image_column, label_column, min_images_per_place, name=str(source))
