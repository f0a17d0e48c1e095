"""The one image opener of vprhub, and the listing of image folders.

Every image that becomes a descriptor (index building, evaluation, training, the pipeline)
is opened here, so that one file always gives one picture:

* EXIF orientation is applied;
* 16-bit images (``I;16*``, ``I``) are scaled to 8 bits (65535 -> 255), never clipped;
* a JPEG larger than needed is decoded at a reduced size (Pillow ``draft``: DCT scaling by
  1/2, 1/4 or 1/8) while it stays at least twice the requested size, so a 100-megapixel
  photo costs a few megabytes; other formats are bounded by ``max_pixels``;
* images above ``max_pixels`` (decompression bombs) are refused before decoding.

Anything unreadable raises :class:`UnreadableImageError` (a ``ValueError``) naming the input.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .modeling.rgb import to_rgb

#: Pillow's own error threshold (twice ``Image.MAX_IMAGE_PIXELS``, about 179 megapixels).
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
#: Manifests of vprhub's own output folders (a place index, a descriptor store): such folders
#: inside an image folder are not listed as images.
OUTPUT_MANIFESTS = ("vprindex.json", "store.json")
#: A JPEG is decoded at reduced size only while it stays this many times the requested size.
DRAFT_OVERSAMPLING = 2
EXIF_ORIENTATION = 0x0112
#: Formats whose Pillow readers hand the file to another program (EPS: Ghostscript): never opened.
PROGRAM_FORMATS = frozenset({"EPS"})


class UnreadableImageError(ValueError):
    """An input that is not a readable image (missing, truncated, corrupt, not an image, a bomb)."""


#: What reading an image may raise (``OSError`` from datasets that read files themselves);
#: callers that skip bad inputs catch exactly these.
UNREADABLE_IMAGE_ERRORS = (UnreadableImageError, OSError)


def describe(source: Any) -> str:
    """A short name of an input for reports: the path or URL, else ``<type>``."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def open_image(
    source: Any,
    size: tuple[int, int] | None = None,
    timeout: float | None = None,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """An RGB PIL image from a path, URL, bytes, file object, PIL image or array.

    Args:
        source: a path, an ``http(s)://`` URL, ``bytes``, a binary file object, a PIL image,
            a ``datasets`` image record (``{"bytes", "path"}``), or an array (``[H, W]``, ``[H, W, C]``, ``[C, H, W]``; uint8, uint16, or floats in [0, 1]).
        size: ``(height, width)`` the caller will resize to; lets big JPEGs decode at reduced size.
        timeout: seconds allowed to fetch a URL.
        max_pixels: larger images are refused as decompression bombs.
        name: how errors call the input (default: its path, or its type).
        formats: the Pillow formats accepted (e.g. ``("JPEG", "PNG")``; default: any Pillow reads).
            An encoded input in another format is refused, naming it, before its decoder runs.
            :data:`PROGRAM_FORMATS` are refused in any case, once their header is read.
    """
    if isinstance(source, Mapping):  # a `datasets` Image value: {"bytes", "path"}
        if source.get("bytes") is not None:
            return open_image(source["bytes"], size, timeout, max_pixels, name, formats)
        if source.get("path"):
            return open_image(source["path"], size, timeout, max_pixels, name, formats)
        raise UnreadableImageError("image record has neither bytes nor a path")
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name or describe(source))
        return to_rgb(_upright(source))
    name = name or describe(source)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            source = io.BytesIO(_fetch(text, timeout))
        elif not os.path.isfile(text):
            raise UnreadableImageError(_not_a_file(text))
    elif isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif not hasattr(source, "read"):
        raise UnreadableImageError(
            f"unsupported image input of type {type(source).__name__}: "
            "expected a path, URL, bytes, file object, PIL image or numpy array"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(source, formats=formats) as image:  # reads the header only
                if image.format in PROGRAM_FORMATS:
                    raise UnreadableImageError(
                        f"cannot read image {name}: {image.format} images are not read (Pillow hands them to another program)"
                    )
                _check_pixels(image.size, max_pixels, name)
                if size is not None and image.format == "JPEG":
                    side = DRAFT_OVERSAMPLING * max(size)
                    image.draft(image.mode, (side, side))
                image.load()
                return to_rgb(_upright(image))
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot read image {name}: {_unidentified(source, formats)}") from None
    except Image.DecompressionBombError:  # Pillow's own check in Image.open, above MAX_PIXELS
        raise UnreadableImageError(
            f"cannot read image {name}: decompression bomb refused (more than {min(max_pixels, MAX_PIXELS)} pixels)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UnreadableImageError(f"cannot read image {name}: {err}") from None


def decode_resized(
    source: Any, size: tuple[int, int], resample: int = Image.BILINEAR, timeout: float | None = None
) -> np.ndarray:
    """``source`` opened with :func:`open_image` and resized to ``size`` (height, width): uint8 ``[H, W, 3]``
    (a writable array, so that ``torch.from_numpy`` may wrap it)."""
    image = open_image(source, size, timeout)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample)
    return np.array(image)


def _not_a_file(path: str) -> str:
    """Why ``path`` cannot be opened as an image file."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"cannot read image {path}: a broken symbolic link"
    if os.path.exists(path):
        return f"cannot read image {path}: not a regular file"
    return f"image file not found: {path}"


def _unidentified(source: Any, formats: Sequence[str] | None) -> str:
    """Why Pillow could not open ``source`` (a path or file object) with ``formats``: the format
    its first bytes announce when that one is not accepted (told by each Pillow format's own
    signature check, no decoder runs)."""
    if formats is None:
        return "not an image format Pillow can read"
    try:
        with open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source) as file:
            file.seek(0)
            prefix = file.read(16)
    except (OSError, ValueError):
        prefix = b""
    Image.init()
    for kind, (_, accept) in Image.OPEN.items():
        try:
            signed = accept is not None and accept(prefix)
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Pillow's own open: too few bytes
            signed = False
        if signed and not isinstance(signed, str) and kind not in formats:
            return f"{kind} images are not accepted (accepted formats: {', '.join(formats)})"
    return f"not an image in an accepted format ({', '.join(formats)})"


def _upright(image: Image.Image) -> Image.Image:
    """The image as displayed: its EXIF orientation applied (no copy when there is none)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise UnreadableImageError(
            f"cannot read image {name}: decompression bomb refused ({width}x{height} = {width * height} pixels, "
            f"limit {max_pixels})"
        )


def _fetch(url: str, timeout: float | None) -> bytes:
    import httpx

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise UnreadableImageError(f"cannot fetch image {url}: {err}") from None
    return response.content


def _array_to_image(array: np.ndarray) -> Image.Image:
    shape = array.shape
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UnreadableImageError(
            f"array image must be [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got shape {shape}"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise UnreadableImageError(f"float array image must hold values in [0, 1] (shape {shape})")
        array = np.round(array * 255)
    elif array.dtype == np.uint16:
        array = (array.astype(np.uint32) * 255 + 32767) // 65535
    elif array.dtype != np.uint8:
        raise UnreadableImageError(
            f"array image must be uint8, uint16 or float in [0, 1], got {array.dtype} (shape {shape})"
        )
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).convert("RGB")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder`` (recursively, sorted), skipping hidden names below ``folder``.
    Folders vprhub wrote (a place index, a descriptor store) are left out. Broken links and
    special files (FIFOs, sockets) are listed too: opening them raises an
    :class:`UnreadableImageError` that names them, so a build counts and reports them.

    Symbolic links to folders are followed, but a folder reached twice (a link loop, or two
    links to one place) is listed once. Only names *below* ``folder`` count as hidden, so
    ``../x/db`` or ``~/.data/db`` work.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise ValueError(f"image folder {root} is a file, not a folder")
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    return sorted(_walk(root, set()))


def _is_vprhub_output(folder: Path) -> bool:
    """A place index or descriptor store that vprhub wrote (its manifest names a ``vprhub-`` format)."""
    for name in OUTPUT_MANIFESTS:
        try:
            with open(folder / name, encoding="utf-8") as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("vprhub-"):
            return True
    return False


def _walk(folder: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    stat = folder.stat()
    if (stat.st_dev, stat.st_ino) in seen:
        return
    seen.add((stat.st_dev, stat.st_ino))
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        warnings.warn(f"cannot list {folder}: {err}", stacklevel=3)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()
        except OSError:  # a looping link: listed, so the report names it
            is_dir = False
        if is_dir:
            if not _is_vprhub_output(path):
                yield from _walk(path, seen)
        else:  # files, and broken links or special files, which the opener then reports as skipped
            yield path
