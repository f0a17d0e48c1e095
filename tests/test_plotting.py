"""Match plots carry a legend and the distance in metres between query and hits (gmberton UTM names)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vprhub.pipelines import plot_matches
from vprhub.pipelines.plotting import COLOURS, GAP, LEGEND, _font, _label


def write(folder, name: str, seed: int) -> str:
    path = folder / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_labels_give_the_distance_in_metres(tmp_path):
    query = write(tmp_path, "@500000.00@4000000.00@q.jpg", 0)
    hit = {"index": 3, "score": 0.5, "metadata": {"path": write(tmp_path, "@500030.00@4000040.00@d.jpg", 1)}}
    assert _label(hit, 1, np.array([500000.0, 4000000.0]))[1] == "50.0 m from the query"
    no_utm = {"index": 4, "score": 0.25, "metadata": {"path": write(tmp_path, "plain.jpg", 2)}}
    assert _label(no_utm, 2, np.array([500000.0, 4000000.0])) == ["#2  id 4  score 0.2500", "path: plain.jpg"]
    assert query  # written for the plot test below


def test_plot_has_a_legend_under_the_panels(tmp_path):
    query = write(tmp_path, "@500000.00@4000000.00@q.jpg", 0)
    hits = [
        {"index": 0, "score": 0.9, "metadata": {"path": write(tmp_path, "@500010.00@4000000.00@a.jpg", 1)}},
        {"index": 1, "score": 0.8, "metadata": {"path": write(tmp_path, "@500900.00@4000000.00@b.jpg", 2)}},
    ]
    with_truth = Image.open(plot_matches(query, hits, tmp_path / "truth.png", ground_truth={0})).convert("RGB")
    without = Image.open(plot_matches(query, hits, tmp_path / "plain.png")).convert("RGB")
    font, legend_height = _font(), GAP + 20 * 3  # the colour row, then the score and metres notes

    def box_colours(image: Image.Image, kinds: list[str]) -> list[tuple[int, int, int]]:
        """Colours at the centres of the legend boxes, laid out left to right after their labels."""
        y, x, colours = image.height - legend_height + GAP // 2 + 9, GAP + 7, []
        for kind in kinds:
            colours.append(image.getpixel((x, y)))
            x += 20 + int(font.getlength(LEGEND[kind])) + 2 * GAP
        return colours

    kinds = ["query", "match", "wrong"]
    assert box_colours(with_truth, kinds) == [COLOURS[k] for k in kinds]
    assert box_colours(without, ["query", "unknown"]) == [COLOURS["query"], COLOURS["unknown"]]
