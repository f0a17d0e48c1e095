"""Training augmentation on PIL images, seeded per sample (torchvision is not a dependency).

``RandAugment`` follows torchvision's ``RandAugment`` (the augmentation of SALAD and
CricaVPR training: ``Resize`` then ``RandAugment(num_ops=3)``): each call applies
``num_ops`` operations drawn uniformly from the list below at a fixed magnitude bin, with a
random sign for the signed ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.BILINEAR, fillcolor=(0, 0, 0))


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, Image.BILINEAR, fillcolor=(0, 0, 0))


# name -> (function(image, value), maximum value at the last bin, signed)
_OPS = {
    "Identity": (lambda im, v: im, 0.0, False),
    "ShearX": (lambda im, v: _affine(im, (1, v, 0, 0, 1, 0)), 0.3, True),
    "ShearY": (lambda im, v: _affine(im, (1, 0, 0, v, 1, 0)), 0.3, True),
    "TranslateX": (lambda im, v: _affine(im, (1, 0, v * im.width, 0, 1, 0)), 150 / 331, True),
    "TranslateY": (lambda im, v: _affine(im, (1, 0, 0, 0, 1, v * im.height)), 150 / 331, True),
    "Rotate": (_rotate, 30.0, True),
    "Brightness": (lambda im, v: ImageEnhance.Brightness(im).enhance(1 + v), 0.9, True),
    "Color": (lambda im, v: ImageEnhance.Color(im).enhance(1 + v), 0.9, True),
    "Contrast": (lambda im, v: ImageEnhance.Contrast(im).enhance(1 + v), 0.9, True),
    "Sharpness": (lambda im, v: ImageEnhance.Sharpness(im).enhance(1 + v), 0.9, True),
    "Posterize": (lambda im, v: ImageOps.posterize(im, int(v)), None, False),
    "Solarize": (lambda im, v: ImageOps.solarize(im, int(v)), None, False),
    "AutoContrast": (lambda im, v: ImageOps.autocontrast(im), 0.0, False),
    "Equalize": (lambda im, v: ImageOps.equalize(im), 0.0, False),
}


class RandAugment:
    """``num_ops`` random operations at bin ``magnitude`` of ``num_magnitude_bins``.

    Call as ``augment(image, rng)`` with a ``numpy.random.Generator``; the same generator
    state gives the same result.
    """

    def __init__(self, num_ops: int = 3, magnitude: int = 9, num_magnitude_bins: int = 31):
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, {num_magnitude_bins}), got {magnitude}")
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins

    def _value(self, name: str, maximum: float | None) -> float:
        fraction = self.magnitude / (self.num_magnitude_bins - 1)
        if name == "Posterize":  # 8 bits at bin 0 down to 4 at the last bin
            return 8 - round(4 * fraction)
        if name == "Solarize":  # threshold 255 at bin 0 down to 0
            return 255.0 * (1 - fraction)
        return maximum * fraction

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        names = list(_OPS)
        for choice in rng.integers(0, len(names), self.num_ops):
            name = names[choice]
            function, maximum, signed = _OPS[name]
            value = self._value(name, maximum)
            if signed and rng.random() < 0.5:
                value = -value
            image = function(image, value)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, bins={self.num_magnitude_bins})"
