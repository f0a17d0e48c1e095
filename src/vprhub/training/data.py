"""From places to training batches: loading, resizing, seeded augmentation, the image processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data.places import UNREADABLE_IMAGE_ERRORS, PlaceImages
from ..data.transforms import RandAugment
from ..embedding import Preprocessing


class AugmentedPlaces(torch.utils.data.Dataset):
    """``places`` indexed by the ``(image_index, sample_seed)`` pairs of ``PlaceBatchSampler``.

    An item is ``{"image": PIL.Image | None, "place_id": int}``: the image resized to
    ``image_size`` (height, width) and augmented with a generator seeded by
    ``sample_seed``, or ``None`` when the file cannot be read (the collator skips it; the
    item's ``"unreadable"`` holds ``(image_index, reason)`` for the trainer to report once).
    """

    def __init__(self, places: PlaceImages, image_size: tuple[int, int], augment: RandAugment | None = None):
        self.places, self.image_size, self.augment = places, tuple(image_size), augment

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        label = int(self.places.labels[index])
        try:
            image = self.places.load_image(index)
        except UNREADABLE_IMAGE_ERRORS as error:
            return {"image": None, "place_id": label, "unreadable": (int(index), str(error))}
        height, width = self.image_size
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng(seed))
        return {"image": image, "place_id": label}


class PlaceBatchCollator:
    """Stack a place batch: ``{"pixel_values" [B,3,H,W], "labels" [B], "num_skipped" [1], "unreadable"}``.

    Unreadable images are left out, counted in ``num_skipped`` and listed in ``unreadable``
    as ``(image_index, reason)`` pairs.  Images are already at
    the training size, so only the image processor's rescaling and normalisation remain;
    they are applied to the whole batch at once by the embedding engine's
    :class:`~vprhub.embedding.Preprocessing` (the same code as at evaluation time).
    """

    def __init__(self, image_processor):
        self.preprocessing = Preprocessing.from_processor(image_processor)
        if not isinstance(self.preprocessing, Preprocessing):
            raise ValueError("training needs an image processor that resizes to a fixed height x width")

    def __call__(self, samples: list[dict]) -> dict:
        readable = [sample for sample in samples if sample["image"] is not None]
        if readable:
            pixels = torch.from_numpy(np.stack([np.asarray(sample["image"]) for sample in readable]))
            pixel_values = self.preprocessing.to_model(pixels, torch.device("cpu"), torch.float32)
        else:
            pixel_values = torch.empty(0, 3, 0, 0)
        return {
            "pixel_values": pixel_values,
            "labels": torch.tensor([sample["place_id"] for sample in readable], dtype=torch.long),
            "num_skipped": torch.tensor([len(samples) - len(readable)]),
            "unreadable": [sample["unreadable"] for sample in samples if sample["image"] is None],
        }
