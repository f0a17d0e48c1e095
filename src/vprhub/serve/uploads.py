"""Uploaded photos -> RGB PIL images, refusing anything that is not a reasonable image."""

from __future__ import annotations

from PIL import Image

from ..image_io import open_image

#: Raster formats an upload may be in; anything else (EPS, which Pillow hands to Ghostscript,
#: and every rarer format) is refused before a decoder sees it.
UPLOAD_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")


def decode_image(
    data: bytes, max_pixels: int, size: tuple[int, int] | None = None, name: str = "upload"
) -> Image.Image:
    """The upload opened as every other input is (:func:`vprhub.image_io.open_image`: EXIF
    orientation, 16-bit scaled, a large JPEG decoded at reduced size for the model's ``size``) when
    it is in one of :data:`UPLOAD_FORMATS`; ``ValueError`` with the reason, naming the image ``name``, otherwise.

    The pixel count is checked from the header, before any pixel is decoded (a decompression
    bomb never reaches memory).
    """
    if not data:
        raise ValueError(f"cannot read image {name}: the upload is empty")
    return open_image(data, size, max_pixels=max_pixels, name=name, formats=UPLOAD_FORMATS)
