"""``vprhub index plan`` against the sizes actually written, and compression options."""

from __future__ import annotations

import numpy as np
import pytest

from vprhub.cli import main
from vprhub.pipelines import PlaceIndex
from vprhub.pipelines.compression import compression_factory, place_recall, synthetic_city
from vprhub.pipelines.plan import DEFAULT_OPTIONS, _sample_rows, default_options, plan

DIM = 64


@pytest.mark.parametrize("option", ["flat", "pca16-fp16", "binary32"])
def test_plan_within_ten_percent_of_written_sizes(tmp_path, option):
    n = 3000
    (row,) = [r for r in plan(n, DIM, [option]) if r["option"] == option]
    database, *_ = synthetic_city(DIM, places=n // 4, views=4, seed=3)
    index = PlaceIndex(DIM, index_type=option)
    index.add(database, _sample_rows(n))
    index.save(tmp_path / "map.vprindex")
    for name in ("index.faiss", "entries.jsonl"):
        written = (tmp_path / "map.vprindex" / name).stat().st_size
        assert abs(row["disk_bytes"][name] - written) <= 0.1 * written, (name, row["disk_bytes"][name], written)
    assert row["factory"] == compression_factory(option, DIM, 1200) if option != "flat" else row["factory"] == "Flat"


def test_compression_keeps_the_transform_and_queries_go_through_it(tmp_path):
    database, db_places, queries, query_places = synthetic_city(DIM, places=200, views=4)
    exact = PlaceIndex(DIM)
    exact.add(database)
    pca = PlaceIndex(DIM, index_type="pca48-fp16")
    pca.add(database)
    pca.save(tmp_path / "pca.vprindex")
    loaded = PlaceIndex.load(tmp_path / "pca.vprindex")
    assert loaded.index_type == "pca48-fp16" and loaded.factory == "PCA48,L2norm,SQfp16"
    for a, b in zip(pca.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)  # raw 64-d queries, projected by the stored PCA
    recall = {name: place_recall(index.search(queries, 1)[1], db_places, query_places, 1)
              for name, index in (("exact", exact), ("pca", loaded))}
    assert recall["pca"] >= 0.95 * recall["exact"]
    binary = PlaceIndex(DIM, index_type="binary32")
    binary.add(database)
    scores, ids = binary.search(database[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2] and scores[:, 0].tolist() == [1.0, 1.0, 1.0]  # Hamming 0 -> 1
    with pytest.raises(ValueError, match="unknown compression|unknown index type"):
        PlaceIndex(DIM, index_type="pca")
    with pytest.raises(ValueError, match="PCA width 128 must be between 1 and the descriptor width 64"):
        PlaceIndex(DIM, index_type="pca128").add(database)


def test_cli_plan(capsys):
    assert main(["index", "plan", "--images", "100000", "--dim", str(DIM), "--compress", "fp16", "--json"]) == 0
    import json

    rows = {r["option"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"flat", "fp16"}
    # 4 bytes per value + an 8-byte id; half the values for float16
    assert rows["flat"]["bytes_per_image"] == pytest.approx(4 * DIM + 8, rel=0.01)
    assert rows["fp16"]["bytes_per_image"] == pytest.approx(2 * DIM + 8, rel=0.01)
    assert rows["fp16"]["retention@1"] == pytest.approx(1.0, abs=0.01)
    assert main(["index", "plan", "--images", "10"]) == 2
    assert "give --model or --dim" in capsys.readouterr().err


def test_default_options_are_those_the_descriptor_width_allows():
    assert default_options(8448) == list(DEFAULT_OPTIONS)  # SALAD's width: every default fits
    # 160 dimensions: no PCA to 256, no 512-bit codes; nothing else is refused
    assert default_options(160) == ["flat", "fp16"]
    assert default_options(512) == list(DEFAULT_OPTIONS)
