"""Pictures of retrieval results: a query beside its best matches, with a legend (PIL only)."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..utils import FileKind, atomic_write_file

TILE = 224
FRAME = 6
GAP = 12
LABEL_LINES = 4
MAX_LINES_DRAWN = 80
COLOURS = {"match": (0, 160, 60), "wrong": (210, 30, 30), "unknown": (150, 150, 150), "query": (40, 90, 200)}
LEGEND = {
    "query": "query",
    "match": "correct place",
    "wrong": "wrong place",
    "unknown": "hit (correctness unknown)",
}
MARK = ("Software", "vprhub plot_matches")  # PNG text chunk: what lets --overwrite recognise a plot


def _is_plot(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(MARK[0]) == MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


PLOT_FILE = FileKind(f"a vprhub match plot (a PNG marked {MARK[0]}={MARK[1]!r})", _is_plot)


def _font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _thumbnail(image: Image.Image | None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The image scaled to fit a square tile, and where it sits in it: (left, top, width, height)."""
    tile = Image.new("RGB", (TILE, TILE), (235, 235, 235))
    if image is None:
        ImageDraw.Draw(tile).text((TILE // 2, TILE // 2), "no image", fill=(90, 90, 90), font=_font(), anchor="mm")
        return tile, (0, 0, TILE, TILE)
    image = ImageOps.contain(image, (TILE, TILE))
    left, top = (TILE - image.width) // 2, (TILE - image.height) // 2
    tile.paste(image, (left, top))
    return tile, (left, top, image.width, image.height)


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _utm(item: Any) -> np.ndarray | None:
    """(easting, northing) from an ``@UTM_east@UTM_north@...`` file name, or ``None``."""
    from ..evaluation.geo_folder import parse_utm

    if not isinstance(item, (str, os.PathLike)):
        return None
    try:
        return np.asarray(parse_utm(item))
    except ValueError:
        return None


def _hit_source(hit: dict) -> Any:
    return hit.get("image", (hit.get("metadata") or {}).get("path"))


def _label(hit: dict, rank: int, query_utm: np.ndarray | None) -> list[str]:
    lines = [f"#{rank}  id {hit['index']}  score {hit['score']:.4f}"]
    if "rerank_score" in hit:
        lines[0] += f"  mnn {hit['rerank_score']:.0f}"
    hit_utm = _utm(_hit_source(hit))
    if query_utm is not None and hit_utm is not None:
        lines.append(f"{np.linalg.norm(hit_utm - query_utm):.1f} m from the query")
    metadata = hit.get("metadata") or {}
    lines += [f"{k}: {Path(v).name if k == 'path' else v}" for k, v in metadata.items()]
    return lines[:LABEL_LINES]


def _legend(width: int, kinds: Sequence[str], notes: Sequence[str]) -> Image.Image:
    """A strip with one coloured box per frame colour used, then the meaning of the label figures."""
    font, line_height = _font(), 20
    strip = Image.new("RGB", (width, GAP + line_height * (1 + len(notes))), "white")
    draw = ImageDraw.Draw(strip)
    x = GAP
    for kind in kinds:
        draw.rectangle([x, GAP // 2 + 2, x + 14, GAP // 2 + 16], fill=COLOURS[kind])
        draw.text((x + 20, GAP // 2 + 2), LEGEND[kind], fill="black", font=font)
        x += 20 + int(font.getlength(LEGEND[kind])) + 2 * GAP
    for i, note in enumerate(notes, 1):
        draw.text((GAP, GAP // 2 + 2 + i * line_height), _fit(note, font, width - 2 * GAP), fill="black", font=font)
    return strip


def _load(item: Any) -> Image.Image | None:
    from ..image_io import open_image

    try:
        return None if item is None else open_image(item)
    except ValueError:
        return None


def _panel(
    image: Image.Image | None, lines: list[str], colour: tuple[int, int, int]
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Framed thumbnail with its label lines below; also the image box inside the panel."""
    font = _font()
    tile, (left, top, width, height) = _thumbnail(image)
    line_height = 18
    panel = Image.new("RGB", (TILE + 2 * FRAME, TILE + 2 * FRAME + LABEL_LINES * line_height + 6), "white")
    draw = ImageDraw.Draw(panel)
    draw.rectangle([0, 0, TILE + 2 * FRAME - 1, TILE + 2 * FRAME - 1], fill=colour)
    panel.paste(tile, (FRAME, FRAME))
    for i, line in enumerate(lines):
        position = (2, TILE + 2 * FRAME + 3 + i * line_height)
        draw.text(position, _fit(line, font, panel.width - 4), fill="black", font=font)
    return panel, (left + FRAME, top + FRAME, width, height)


def plot_matches(
    query: Any,
    hits: Sequence[dict],
    out_png: str | os.PathLike,
    ground_truth: Collection[int] | None = None,
    correspondences: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Write a PNG of ``query`` beside its ``hits`` (as returned by the pipeline with an index).

    Each candidate is shown from ``hit["image"]`` or, failing that, ``hit["metadata"]["path"]``,
    labelled with rank, id, score (and mutual-NN count after re-ranking), its distance in metres
    from the query when both file names carry UTM coordinates (``@east@north@`` names), and
    metadata. With ``ground_truth`` (the ids of correct places) frames are green for correct and
    red for wrong hits. A legend under the picture explains colours and figures. ``correspondences`` (default: each hit's ``"correspondences"``), one
    ``[M, 2, 2]`` array per hit of ((x, y) in the query, (x, y) in the candidate) in [0, 1]
    image coordinates, switches to one row per hit with the matches drawn as lines
    (at most 80 per pair, evenly subsampled). The file is written atomically.
    """
    if not hits:
        raise ValueError("no hits to plot")
    if correspondences is None and any("correspondences" in h for h in hits):
        correspondences = [h.get("correspondences") for h in hits]
    if correspondences is not None and len(correspondences) != len(hits):
        raise ValueError(f"got {len(correspondences)} correspondence sets for {len(hits)} hits")
    query_image = _load(query)
    name = Path(str(query)).name if isinstance(query, (str, os.PathLike)) else "query"
    query_panel, query_box = _panel(query_image, ["query", name], COLOURS["query"])
    candidates = [_load(_hit_source(h)) for h in hits]
    query_utm = _utm(query)

    def colour(hit: dict) -> tuple[int, int, int]:
        if ground_truth is None:
            return COLOURS["unknown"]
        return COLOURS["match"] if hit["index"] in ground_truth else COLOURS["wrong"]

    labels = [_label(h, r, query_utm) for r, h in enumerate(hits, 1)]
    panels, boxes = zip(*(_panel(img, label, colour(h)) for h, img, label in zip(hits, candidates, labels)))
    pw, ph = query_panel.size
    if correspondences is None:
        canvas = Image.new("RGB", (GAP + (pw + GAP) * (len(panels) + 1), ph + 2 * GAP), "white")
        for i, panel in enumerate([query_panel, *panels]):
            canvas.paste(panel, (GAP + i * (pw + GAP), GAP))
    else:
        left_q, left_c = GAP, 5 * GAP + pw  # a wider gap, for the lines
        canvas = Image.new("RGB", (left_c + pw + GAP, GAP + (ph + GAP) * len(panels)), "white")
        draw = ImageDraw.Draw(canvas)
        for row, (panel, box, pairs) in enumerate(zip(panels, boxes, correspondences)):
            top = GAP + row * (ph + GAP)
            canvas.paste(query_panel, (left_q, top))
            canvas.paste(panel, (left_c, top))
            if pairs is not None and len(pairs):
                _draw_lines(draw, np.asarray(pairs, dtype=np.float64), ((left_q, top), query_box), ((left_c, top), box))
    kinds = ["query", *(("match", "wrong") if ground_truth is not None else ("unknown",))]
    notes = ["#rank, id of the hit in the index, score: cosine similarity of the global descriptors"]
    if any("rerank_score" in h for h in hits):
        notes.append("mnn: mutual nearest neighbours of the local features (re-ranking score)")
    if any(" m from the query" in line for label in labels for line in label):
        notes.append("m from the query: distance between the UTM coordinates in the file names")
    legend = _legend(canvas.width, kinds, notes)
    picture = Image.new("RGB", (canvas.width, canvas.height + legend.height), "white")
    picture.paste(canvas, (0, 0))
    picture.paste(legend, (0, canvas.height))
    mark = PngInfo()
    mark.add_text(*MARK)
    with atomic_write_file(out_png) as handle:
        picture.save(handle, format="PNG", pnginfo=mark)
    return Path(out_png)


Placement = tuple[tuple[int, int], tuple[int, int, int, int]]  # panel origin, image box in the panel


def _draw_lines(draw: ImageDraw.ImageDraw, pairs: np.ndarray, query: Placement, candidate: Placement) -> None:
    if pairs.ndim != 3 or pairs.shape[1:] != (2, 2):
        raise ValueError(f"correspondences must be [M, 2, 2] arrays, got shape {list(pairs.shape)}")
    keep = np.linspace(0, len(pairs) - 1, min(len(pairs), MAX_LINES_DRAWN)).round().astype(int)
    points = []
    for side, ((ox, oy), (left, top, width, height)) in enumerate((query, candidate)):
        points.append(pairs[keep, side] * [width, height] + [ox + left, oy + top])
    for i, (a, b) in enumerate(zip(*points)):
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / len(keep), 0.9, 0.95))
        draw.line([tuple(a), tuple(b)], fill=rgb, width=1)
        for x, y in (a, b):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=rgb)
