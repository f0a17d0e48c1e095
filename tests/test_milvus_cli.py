"""``vprhub index build --backend milvus`` / ``vprhub search --index map.db`` on a tiny model and
a real milvus-lite engine: the same hits as the faiss folder, resumed builds, CSV types, --near."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import vprhub
from vprhub.cli import main
from vprhub.data.synthetic import SyntheticPlaces


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcli")
    torch.manual_seed(0)
    vprhub.build_model("salad", image_size=[56, 56]).save_pretrained(root / "model")
    vprhub.vpr_image_processor(56, 56).save_pretrained(root / "model")
    images = SyntheticPlaces(num_places=3, views_per_place=2, image_size=64, seed=1).save_images(root / "db")
    queries = SyntheticPlaces(num_places=3, views_per_place=1, image_size=64, seed=1, first_view=5).save_images(root / "q")
    with open(root / "rows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "zip", "block", "city", "lat", "lon"])
        writer.writerows([[p.name, f"0{2134 + i}", str(10 + i), "Zürich", 45.0 + 0.001 * i, 7.0] for i, p in enumerate(images)])
    return root, images, queries


def test_milvus_build_search_resume(setup, capsys):
    root, images, queries = setup
    common = ["--model", str(root / "model"), "--images", str(root / "db"), "--metadata", str(root / "rows.csv"),
              "--batch-size", "2", "--quiet"]
    uri = str(root / "map.db")
    assert main(["index", "build", *common, "--backend", "milvus", "--uri", uri]) == 0
    assert f"indexed 6 of 6 files (0 already there) into Milvus collection 'places' at {uri}" in capsys.readouterr().out
    assert main(["index", "build", *common, "--backend", "milvus", "--uri", uri]) == 0  # a resumed build: nothing to do
    assert "indexed 6 of 6 files (6 already there)" in capsys.readouterr().out
    more = ["--model", str(root / "model"), "--images", str(root / "q"), "--quiet", "--backend", "milvus", "--uri", uri]
    assert main(["index", "build", *more]) == 0  # other files into the same collection: this run's count
    printed = capsys.readouterr().out
    assert "indexed 3 of 3 files (0 already there)" in printed and "which holds 9 entries" in printed
    assert main(["index", "build", *common, "--backend", "milvus", "--uri", uri, "--overwrite"]) == 0  # rebuilt
    assert "indexed 6 of 6 files (0 already there)" in capsys.readouterr().out
    assert main(["index", "build", *common, "--out", str(root / "map.vprindex")]) == 0
    capsys.readouterr()

    results = {}
    for name, index in (("milvus", uri), ("faiss", str(root / "map.vprindex"))):
        assert main(["search", "--index", index, *map(str, queries), "--top-k", "4", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    for m, f in zip(results["milvus"], results["faiss"]):
        assert [h["index"] for h in m["hits"]] == [h["index"] for h in f["hits"]]
        assert [h["score"] for h in m["hits"]] == pytest.approx([h["score"] for h in f["hits"]], abs=1e-5)
        assert m["hits"][0]["metadata"]["zip"].startswith("02")  # "02134" stays a string

    # geographic prior (entries 0 and 1 lie within 150 m of 45.0005, 7.0) and a metadata filter
    for index in (uri, str(root / "map.vprindex")):
        assert main(["search", "--index", index, str(queries[0]), "--top-k", "4", "--json",
                     "--near", "45.0005,7.0", "--radius-m", "150"]) == 0
        hits = json.loads(capsys.readouterr().out)[0]["hits"]
        assert sorted(h["metadata"]["zip"] for h in hits) == ["02134", "02135"]
        assert main(["search", "--index", index, str(queries[0]), "--top-k", "2", "--json", "--where", "zip=02136"]) == 0
        assert [h["metadata"]["zip"] for h in json.loads(capsys.readouterr().out)[0]["hits"]] == ["02136"]
        assert main(["search", "--index", index, str(queries[0]), "--top-k", "2", "--json", "--where", "city=Zürich"]) == 0
        assert len(json.loads(capsys.readouterr().out)[0]["hits"]) == 2  # non-ASCII values: Milvus too
        # a number where the CSV metadata holds text matches nothing: an error saying so, not an empty answer
        assert main(["search", "--index", index, str(queries[0]), "--where", "block=12"]) == 2
        assert "the entries hold these values as text, {'block': '12'} would match" in capsys.readouterr().err
        assert main(["search", "--index", index, str(queries[0]), "--json", "--where", 'block="12"']) == 0
        assert [h["metadata"]["block"] for h in json.loads(capsys.readouterr().out)[0]["hits"]] == ["12"]


def test_bad_inputs_are_named(setup, capsys):
    root, images, _ = setup
    with open(root / "dup.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "lat"], [images[0].name, "1.5"], [images[0].name, "2"]])
    with open(root / "nan.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "lat"], [images[0].name, "nan"]])
    base = ["index", "build", "--model", str(root / "model"), "--images", str(root / "db"), "--quiet",
            "--backend", "milvus", "--uri", str(root / "bad.db")]
    assert main([*base, "--metadata", str(root / "dup.csv")]) == 2
    assert "is listed twice (lines 2 and 3)" in capsys.readouterr().err
    assert main([*base, "--metadata", str(root / "nan.csv")]) == 2
    assert "'nan' is not a finite number" in capsys.readouterr().err
    assert main([*base, "--collection", "../x"]) == 2
    assert "invalid Milvus collection name '../x'" in capsys.readouterr().err
    assert not (root / "bad.db").exists()  # refused before anything was written
    assert main(["search", "--index", "http://127.0.0.1:9", "x.jpg"]) == 2
    assert "cannot reach Milvus at http://127.0.0.1:9" in capsys.readouterr().err
    # --uri with the faiss backend is refused, not silently ignored
    faiss_with_uri = ["index", "build", "--model", str(root / "model"), "--images", str(root / "db"), "--quiet",
                      "--out", str(root / "uri.vprindex"), "--uri", str(root / "ignored.db")]
    assert main(faiss_with_uri) == 2
    assert "--uri is for --backend milvus" in capsys.readouterr().err
    assert not (root / "uri.vprindex").exists() and not (root / "ignored.db").exists()
