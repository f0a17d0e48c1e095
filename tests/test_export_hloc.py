"""hloc files: global-feats.h5 and pairs.txt, read back the way hloc's pairs_from_retrieval reads them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import vprhub
from vprhub.cli import main
from vprhub.export.hloc import default_image_root, retrieval_pairs, write_global_features
from vprhub.pipelines import PlaceIndex
from vprhub.pipelines.place_recognition import as_pipeline

SIZE = 56


def hloc_names(path: Path) -> list[str]:
    """hloc.utils.io.list_h5_names: the parent group of every dataset."""
    names = []

    def visit(_, obj):  # a non-None return would stop h5py's walk
        if isinstance(obj, h5py.Dataset):
            names.append(obj.parent.name.strip("/"))

    with h5py.File(str(path), "r", libver="latest") as fd:
        fd.visititems(visit)
    return sorted(set(names))


def hloc_descriptors(path: Path, names: list[str]) -> np.ndarray:
    """hloc.pairs_from_retrieval.get_descriptors, without torch."""
    with h5py.File(str(path), "r", libver="latest") as fd:
        return np.stack([fd[n]["global_descriptor"].__array__() for n in names])


def hloc_pairs(path: Path) -> list[tuple[str, str]]:
    """hloc.utils.parsers.parse_retrieval, as ordered pairs."""
    return [tuple(line.split()) for line in path.read_text().rstrip("\n").split("\n") if line]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A tiny SALAD folder and images in nested folders: images/db/{north,south}/..., images/query/..."""
    root = tmp_path_factory.mktemp("hloc")
    torch.manual_seed(0)
    model = vprhub.build_model("salad", initializer_range=0.1, image_size=[SIZE, SIZE])
    model.save_pretrained(root / "model")
    vprhub.vpr_image_processor(SIZE, SIZE).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    looks = [rng.integers(0, 256, (4, 4, 3)).astype(np.float64) for _ in range(5)]

    def picture(place: int) -> Image.Image:
        pixels = np.kron(looks[place], np.ones((16, 16, 1))) + rng.normal(0, 25, (64, 64, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    database = {}
    for place in range(5):
        name = f"db/{'north' if place < 3 else 'south'}/place{place}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        picture(place).save(root / "images" / name)
        database[name] = place
    queries = []
    for place in (1, 3):
        path = root / "images" / "query" / f"q{place}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(place).save(path)
        queries.append(path)
    index = root / "map.vprindex"
    args = ["index", "build", "--model", str(root / "model"), "--images", str(root / "images" / "db")]
    assert main([*args, "--out", str(index), "--quiet", "--batch-size", "2"]) == 0
    pipe = as_pipeline(str(root / "model"))
    reference = {name: pipe(str(root / "images" / name)) for name in database}
    return root, index, queries, reference


def test_global_features_in_hloc_layout(scene, capsys):
    root, index, _, reference = scene
    out16, out32 = root / "global-feats.h5", root / "global-feats-32.h5"
    assert main(["index", "export", "--index", str(index), "--hloc", str(out16)]) == 0
    assert main(["index", "export", "--index", str(index), "--hloc", str(out32), "--dtype", "float32"]) == 0
    names = sorted(n.removeprefix("db/") for n in reference)  # relative to the folder the index was built from
    assert hloc_names(out16) == names == hloc_names(out32)
    assert names[0] == "north/place0.jpg"  # a name with '/' is a nested group, as h5py makes it for hloc
    half, full = hloc_descriptors(out16, names), hloc_descriptors(out32, names)
    assert half.dtype == np.float16 and full.dtype == np.float32
    assert half.shape == full.shape == (5, reference["db/north/place0.jpg"].size)
    np.testing.assert_allclose(full, np.stack([reference[f"db/{n}"] for n in names]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(half, full.astype(np.float16))
    with h5py.File(out16, "r") as fd:
        assert set(fd["north/place0.jpg"]) == {"global_descriptor"}
        assert fd["north/place0.jpg/global_descriptor"].shape == (160,)

    again = ["index", "export", "--index", str(index), "--hloc", str(out16), "--image-root", str(root / "images")]
    assert main(again) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert hloc_names(out16) == sorted(reference)  # names now carry the db/ prefix hloc filters on
    foreign = root / "foreign.h5"
    with h5py.File(foreign, "w") as fd:
        fd.create_group("a.jpg").create_dataset("global_descriptor", data=np.zeros(3))
    assert main(["index", "export", "--index", str(index), "--hloc", str(foreign), "--overwrite"]) == 2
    assert "refusing to replace" in capsys.readouterr().err and hloc_names(foreign) == ["a.jpg"]
    outside = ["--image-root", str(root / "images" / "query")]
    assert main(["index", "export", "--index", str(index), "--hloc", str(root / "x.h5"), *outside]) == 2
    assert "is not inside the image root" in capsys.readouterr().err


def test_search_writes_hloc_pairs(scene, capsys):
    root, index, queries, reference = scene
    pairs_file = root / "pairs.txt"
    args = ["search", "--index", str(index), *map(str, queries), "--top-k", "2", "--pairs", str(pairs_file)]
    assert main([*args, "--image-root", str(root / "images"), "--query-root", str(root / "images")]) == 0
    pipe = as_pipeline(str(root / "model"))
    names = sorted(reference)
    database = np.stack([reference[n] for n in names])
    expected = []
    for query in queries:
        scores = database @ pipe(str(query))
        expected += [(f"query/{query.name}", names[j]) for j in np.argsort(-scores)[:2] if scores[j] >= 0]
    assert hloc_pairs(pairs_file) == expected and len(expected) == 4
    assert ("query/q1.jpg", "db/north/place1.jpg") in expected  # the query's own place comes first
    assert expected[0] == ("query/q1.jpg", "db/north/place1.jpg")

    again = ["search", "--index", str(index), str(queries[0]), "--top-k", "1", "--pairs"]
    assert main([*again, str(pairs_file)]) == 2
    assert "pairs.txt exists; pass --overwrite" in capsys.readouterr().err
    assert main([*again, str(pairs_file), "--overwrite"]) == 0  # a pairs file vprhub wrote
    assert hloc_pairs(pairs_file) == [("q1.jpg", "north/place1.jpg")]  # defaults: the queries' folder, the index's


def test_search_pairs_never_replace_other_files(scene, capsys):
    """A user lost a database image to ``--pairs imgs/img00.jpg``; a folder failed only after the search."""
    root, index, queries, _ = scene
    photo = root / "images" / "db" / "north" / "place0.jpg"
    before = photo.read_bytes()
    search = ["search", str(queries[0]), "--top-k", "1", "--overwrite", "--pairs"]
    assert main([*search, str(photo), "--index", str(index)]) == 2
    assert "is not a vprhub pairs file" in capsys.readouterr().err and photo.read_bytes() == before
    # checked before the index is opened: a missing index is not what gets reported
    assert main([*search, str(root / "images"), "--index", str(root / "missing.vprindex")]) == 2
    assert "images is a folder; give the file to write" in capsys.readouterr().err


def test_pairs_follow_pairs_from_retrieval_rules(tmp_path):
    hits = [[{"index": 0, "score": 0.9, "metadata": {"path": str(tmp_path / "db" / "a.jpg")}},
             {"index": 1, "score": 0.8, "metadata": {"path": str(tmp_path / "db" / "b.jpg")}},
             {"index": 2, "score": -0.1, "metadata": {"path": str(tmp_path / "db" / "c.jpg")}}]]
    # a query that is itself in the database is never paired with itself; negative scores are dropped
    assert retrieval_pairs(["db/a.jpg"], hits, tmp_path) == [("db/a.jpg", "db/b.jpg")]
    spaced = [[{"index": 0, "score": 0.9, "metadata": {"path": str(tmp_path / "my photo.jpg")}}]]
    with pytest.raises(ValueError, match="'my photo.jpg' holds whitespace"):
        retrieval_pairs(["q.jpg"], spaced, tmp_path)
    with pytest.raises(ValueError, match="records no image path"):
        retrieval_pairs(["q.jpg"], [[{"index": 7, "score": 0.9, "metadata": {}}]], tmp_path)


def test_index_without_recorded_root_uses_the_images_common_folder(tmp_path):
    index = PlaceIndex(2)
    paths = [tmp_path / "x" / "a" / "1.jpg", tmp_path / "x" / "b" / "2.jpg"]
    index.add(np.eye(2, dtype=np.float32), metadata=[{"path": str(p)} for p in paths])
    assert default_image_root(index) == tmp_path / "x"
    names = write_global_features(index, tmp_path / "g.h5")
    assert names == ["a/1.jpg", "b/2.jpg"] == hloc_names(tmp_path / "g.h5")
    np.testing.assert_array_equal(hloc_descriptors(tmp_path / "g.h5", names), np.eye(2, dtype=np.float16))
    index.add(np.ones((1, 2), np.float32))  # an entry added from an in-memory image has no name
    with pytest.raises(ValueError, match="entry 2 records no image path"):
        write_global_features(index, tmp_path / "g2.h5")
