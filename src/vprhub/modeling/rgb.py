"""RGB as vprhub reads images: 16-bit (and 32-bit integer) grey levels scaled to 8 bits, alpha dropped.

Self-contained (numpy and Pillow): :mod:`vprhub.image_io` and the image processor both convert
through it, and saving the processor copies it into the model folder with the processor's code.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB; 16-bit grey levels scaled from 0..65535 to 0..255 (not clipped at 255)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32, copy=False)
        grey = ((np.minimum(values, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
