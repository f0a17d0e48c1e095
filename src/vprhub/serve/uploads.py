"""Uploaded photos -> RGB PIL images, refusing anything that is not a reasonable image."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An upright RGB image from encoded bytes; ``ValueError`` with the reason otherwise.

    The pixel count is checked from the header, before any pixel is decoded (a
    decompression bomb never reaches memory); EXIF orientation is applied.
    """
    if not data:
        raise ValueError("the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"the image is {image.width}x{image.height} pixels, more than the limit of {max_pixels}"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"the image is too large: {err}") from None
    except (OSError, SyntaxError, EOFError) as err:  # truncated or corrupt data
        raise ValueError(f"cannot decode the image: {err}") from None
