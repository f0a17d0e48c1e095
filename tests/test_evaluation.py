"""Recall@K parity and the benchmark readers, on layouts generated on disk."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from parity import load_expected, load_manifest
from PIL import Image

from vprhub.evaluation import (
    VPRTestSet,
    compute_recalls,
    load_test_set,
    parse_utm,
    radius_positives,
    read_geo_folder,
    read_msls,
    read_npy_lists,
    recalls_from_predictions,
    search,
)
from vprhub.evaluation.recall import search_readable

RADIUS = 25.0


# --------------------------------------------------------------------------- generators
def write_image(path: Path, pixels: np.ndarray | None = None, seed: int = 0) -> Path:
    """A small JPEG: ``pixels`` ``[H, W, 3]`` uint8, or random ones."""
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def place_pixels(place: int, seed: int, noise: float = 40.0) -> np.ndarray:
    """The look of ``place`` (a fixed 4x4 colour pattern, upsampled) plus per-image noise."""
    base = np.random.default_rng(1000 + place).uniform(0, 255, (4, 4, 3))
    image = np.kron(base, np.ones((8, 8, 1))) + np.random.default_rng(seed).normal(0, noise, (32, 32, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def utm_name(easting: float, northing: float, note: str = "") -> str:
    """A file name of the geo-localization benchmark's downloader."""
    return f"@{easting:.2f}@{northing:.2f}@17@T@40.4@-80.0@{note}@@@@@@@@.jpg"


def make_places(seed: int, num_places: int = 6) -> np.ndarray:
    """Place centres 100 m apart along a street (eastings) with some northing jitter."""
    rng = np.random.default_rng(seed)
    return np.stack([585000.0 + 100.0 * np.arange(num_places), 4477000.0 + rng.uniform(-5, 5, num_places)], 1)


def write_geo_dataset(folder: Path, seed: int = 0) -> dict:
    """database/ (in per-place sub-folders) and queries/ in the @UTM naming; returns the ground truth."""
    rng = np.random.default_rng(seed)
    places = make_places(seed)
    db_utm, db_place, q_utm, q_place = [], [], [], []
    for place, centre in enumerate(places):
        for j in range(3):
            db_utm.append(centre + rng.uniform(-10, 10, 2))
            db_place.append(place)
        q_utm.append(centre + rng.uniform(-8, 8, 2))
        q_place.append(place)
    q_utm.append(places[-1] + np.array([400.0, 0.0]))  # a query far from every database image
    q_place.append(len(places) - 1)
    db_paths, q_paths = [], []
    for i, (utm, place) in enumerate(zip(db_utm, db_place)):
        path = folder / "database" / f"seq{place}" / utm_name(*utm, note=f"db{i}")
        db_paths.append(write_image(path, place_pixels(place, seed=10 * i + 1)))
    for i, (utm, place) in enumerate(zip(q_utm, q_place)):
        path = folder / "queries" / utm_name(*utm, note=f"q{i}")
        q_paths.append(write_image(path, place_pixels(place, seed=10 * i + 7, noise=60.0)))
    order_db = sorted(range(len(db_paths)), key=lambda i: str(db_paths[i]))
    order_q = sorted(range(len(q_paths)), key=lambda i: str(q_paths[i]))
    db_utm, q_utm = np.asarray(db_utm)[order_db], np.asarray(q_utm)[order_q]
    return {
        "database": [db_paths[i] for i in order_db],
        "queries": [q_paths[i] for i in order_q],
        "positives": brute_force_positives(db_utm, q_utm),
    }


def brute_force_positives(db_utm: np.ndarray, q_utm: np.ndarray, radius: float = RADIUS) -> list[list[int]]:
    """Reference positives: every pair's distance in float64, ``<= radius`` (sklearn's convention)."""
    return [[j for j in range(len(db_utm)) if np.hypot(*(q - db_utm[j])) <= radius] for q in q_utm]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_msls(root: Path, seed: int = 0) -> dict:
    """MSLS ``train_val/{cph,sf}/{query,database}`` with CSVs as pandas writes them.

    Per city and side the rows are: normal images, one panorama (dropped), one image outside
    the ``all`` subtask (dropped); one query per city has no positive (excluded).
    """
    rng = np.random.default_rng(seed)
    expected = {"database": [], "queries": [], "positives": [], "excluded": 0}
    for c, city in enumerate(("cph", "sf")):
        places = make_places(seed + c) + np.array([10000.0 * c, 0.0])
        city_db_offset = len(expected["database"])
        sides = {}
        for side, per_place in (("database", 2), ("query", 1)):
            rows = []
            for place, centre in enumerate(places):
                for j in range(per_place):
                    rows.append((f"{city}{side[0]}{place}x{j}", centre + rng.uniform(-8, 8, 2), place, False, True))
            rows.append((f"{city}{side[0]}pano", places[0], 0, True, True))
            rows.append((f"{city}{side[0]}other", places[1], 1, False, False))
            if side == "query":
                rows.append((f"{city}qfar", places[-1] + np.array([500.0, 0.0]), 0, False, True))
            folder = root / "train_val" / city / side
            write_csv(
                folder / "postprocessed.csv",
                [
                    "",
                    "key",
                    "lat",
                    "lon",
                    "easting",
                    "northing",
                    "night",
                    "control_panel",
                    "view_direction",
                    "unique_cluster",
                ],
                [
                    [i, key, 55.6, 12.5, f"{utm[0]:.6f}", f"{utm[1]:.6f}", False, False, "Forward", i]
                    for i, (key, utm, _, _, _) in enumerate(rows)
                ],
            )
            write_csv(
                folder / "raw.csv",
                ["", "key", "lon", "lat", "ca", "captured_at", "pano"],
                [[i, key, 12.5, 55.6, 90.0, "2017-06-01", pano] for i, (key, _, _, pano, _) in enumerate(rows)],
            )
            write_csv(
                folder / "subtask_index.csv",
                ["", "all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d"],
                [[i, keep, False, False, False, False, False, False] for i, (_, _, _, _, keep) in enumerate(rows)],
            )
            for i, (key, _, place, _, _) in enumerate(rows):
                write_image(folder / "images" / f"{key}.jpg", place_pixels(place, seed=100 * c + 10 * i + len(side)))
            sides[side] = [
                (folder / "images" / f"{key}.jpg", utm) for key, utm, _, pano, keep in rows if keep and not pano
            ]
        db_utm = np.array([utm for _, utm in sides["database"]])
        expected["database"] += [path for path, _ in sides["database"]]
        for (path, utm), found in zip(
            sides["query"], brute_force_positives(db_utm, np.array([u for _, u in sides["query"]]))
        ):
            if found:
                expected["queries"].append(path)
                expected["positives"].append([city_db_offset + j for j in found])
            else:
                expected["excluded"] += 1
    return expected


def write_npy_lists(folder: Path, prefix: str, style: str) -> dict:
    """SALAD-style lists: ``gt`` object arrays (Nordland), ``[N, 1]`` int gt (SPED) or qIdx/pIdx (MSLS val)."""
    num_db, num_q = 10, 5
    db_rel = [f"ref/{i:07d}.jpg" for i in range(num_db)]
    q_rel = [f"query/{i:07d}.jpg" for i in range(num_q)]
    for i, rel in enumerate(db_rel):
        write_image(folder / rel, place_pixels(i // 2, seed=i))
    for i, rel in enumerate(q_rel):
        write_image(folder / rel, place_pixels(i, seed=50 + i, noise=60.0))
    np.save(folder / f"{prefix}_dbImages.npy", np.array(db_rel))
    np.save(folder / f"{prefix}_qImages.npy", np.array(q_rel))
    positives = [[2 * i, 2 * i + 1] for i in range(num_q)]
    if style == "gt":
        gt = np.empty(num_q, dtype=object)
        gt[:] = [np.array(p) for p in positives]
        np.save(folder / f"{prefix}_gt.npy", gt, allow_pickle=True)
        return {
            "database": [folder / p for p in db_rel],
            "queries": [folder / p for p in q_rel],
            "positives": positives,
        }
    if style == "single":
        np.save(folder / f"{prefix}_gt.npy", np.array([[2 * i] for i in range(num_q)], dtype=np.int64))
        return {
            "database": [folder / p for p in db_rel],
            "queries": [folder / p for p in q_rel],
            "positives": [[2 * i] for i in range(num_q)],
        }
    q_idx = np.array([0, 2, 3, 4])  # query 1 is not evaluated
    np.save(folder / f"{prefix}_qIdx.npy", q_idx)
    p_idx = np.empty(len(q_idx), dtype=object)
    p_idx[:] = [np.array(positives[i]) for i in q_idx]
    np.save(folder / f"{prefix}_pIdx.npy", p_idx, allow_pickle=True)
    return {
        "database": [folder / p for p in db_rel],
        "queries": [folder / q_rel[i] for i in q_idx],
        "positives": [positives[i] for i in q_idx],
    }


def assert_test_set(test_set: VPRTestSet, expected: dict) -> None:
    assert list(test_set.database_paths) == [Path(p) for p in expected["database"]]
    assert list(test_set.query_paths) == [Path(p) for p in expected["queries"]]
    assert [p.tolist() for p in test_set.positives] == [sorted(p) for p in expected["positives"]]


# --------------------------------------------------------------------------- recall
def ranking_recalls(ranking, positives, k_values) -> dict[int, float]:
    """Reference rule: a query counts for K when any of its first K ranked indices is a positive."""
    return {
        k: sum(bool(set(ranking[q][:k]) & set(positives[q])) for q in range(len(ranking))) / len(ranking)
        for k in k_values
    }


def brute_force_recalls(database, queries, positives, k_values):
    """Independent reference: float64 squared distances, stable argsort, then :func:`ranking_recalls`."""
    database, queries = np.asarray(database, np.float64), np.asarray(queries, np.float64)
    order = np.argsort(((queries[:, None] - database[None]) ** 2).sum(-1), axis=1, kind="stable")
    return ranking_recalls(order, positives, k_values)


def test_recall_parity_with_official_fixture():
    manifest = load_manifest("recall")
    inputs = load_expected("recall", "inputs.safetensors")
    expected = load_expected("recall")
    offsets = inputs["gt_offsets"].numpy()
    gt = [inputs["gt_flat"].numpy()[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    assert [g.tolist() for g in gt] == manifest["inputs"]["gt_lists"]
    k_values = expected["k_values"].tolist()
    result = compute_recalls(inputs["database"].numpy(), inputs["queries"].numpy(), gt, k_values)
    np.testing.assert_array_equal(result.predictions, expected["predictions"].numpy())
    np.testing.assert_allclose(result.distances, expected["distances"].numpy(), rtol=1e-5, atol=1e-6)
    assert list(result.recalls) == k_values
    assert np.array(list(result.recalls.values())).tolist() == expected["recalls"].numpy().tolist()
    chunked = compute_recalls(inputs["database"].numpy(), inputs["queries"].numpy(), gt, k_values, chunk_size=3)
    np.testing.assert_array_equal(chunked.predictions, result.predictions)


def test_recall_matches_brute_force_and_inner_product():
    rng = np.random.default_rng(3)
    database, queries = rng.standard_normal((200, 16)), rng.standard_normal((60, 16))
    positives = [rng.choice(200, size=rng.integers(0, 6), replace=False) for _ in range(60)]
    k_values = (1, 3, 10, 25)
    result = compute_recalls(database, queries, positives, k_values, chunk_size=7)
    assert result.recalls == pytest.approx(brute_force_recalls(database, queries, positives, k_values), abs=0)
    assert result.predictions.shape == (60, 25) and result.predictions.dtype == np.int64

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ip = compute_recalls(unit(database), unit(queries), positives, k_values, metric="ip")
    assert ip.recalls == pytest.approx(brute_force_recalls(unit(database), unit(queries), positives, k_values), abs=0)


def test_recalls_from_predictions_rules():
    predictions = np.array([[4, 2, -1], [0, 1, 2], [3, 0, 1], [2, 2, 5]])
    positives = [[2], [], [1], [7]]
    # query 0 found at rank 2; query 1 has no positive; query 2 at rank 3; query 3 never
    assert recalls_from_predictions(predictions, positives, (1, 2, 3, 10)) == {1: 0.0, 2: 0.25, 3: 0.5, 10: 0.5}
    # faiss pads with -1 when the database is smaller than K: padding never counts
    _, found = search(np.eye(3), np.eye(3)[:1], k=5)
    assert found[0, 3:].tolist() == [-1, -1]
    assert recalls_from_predictions(found, [[1]], (1, 5)) == {1: 0.0, 5: 1.0}


def test_search_readable_never_returns_skipped_rows_and_keeps_indices():
    database = np.eye(4, dtype=np.float32)
    database[1] = 0  # an unreadable image's placeholder
    queries = np.stack([np.zeros(4), np.eye(4)[3], np.eye(4)[2]]).astype(np.float32)
    predictions, rows = search_readable(database, queries, 4, skipped_database=[1], skipped_queries=[0])
    assert rows.tolist() == [1, 2]
    assert predictions[:, 0].tolist() == [3, 2]  # indices into the full database
    assert sorted(predictions[0].tolist()) == [-1, 0, 2, 3]  # row 1 never retrieved: padding instead
    with pytest.raises(ValueError, match="none of the 3 query images could be read"):
        search_readable(database, queries, 1, skipped_queries=[0, 1, 2])
    with pytest.raises(ValueError, match="none of the 4 database images could be read"):
        search_readable(database, queries, 1, skipped_database=[0, 1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_values=(5, 1)), "increasing"),
        (dict(k_values=()), "increasing"),
        (dict(queries=np.zeros((2, 3))), "dimension 3"),
        (dict(queries=np.full((2, 4), np.nan)), "NaN"),
        (dict(positives=[[0]]), "positives for 1 queries"),
        (dict(metric="cosine"), "metric"),
    ],
)
def test_recall_bad_input(kwargs, message):
    arguments = dict(database=np.zeros((5, 4)), queries=np.zeros((2, 4)), positives=[[0], [1]], k_values=(1,))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_recalls(**arguments)


# --------------------------------------------------------------------------- radius search
def test_radius_positives_matches_brute_force_including_boundary():
    rng = np.random.default_rng(0)
    database = np.stack([585000 + rng.uniform(0, 300, 400), 4477000 + rng.uniform(0, 60, 400)], 1)
    queries = np.stack([585000 + rng.uniform(-30, 330, 90), 4477000 + rng.uniform(-10, 70, 90)], 1)
    queries[0] = database[5] + np.array([RADIUS, 0.0])  # exactly on the radius: a positive (inclusive)
    expected = brute_force_positives(database, queries)
    assert 5 in expected[0]
    for block, max_pairs in ((256, 1 << 24), (7, 13)):
        found = radius_positives(database, queries, RADIUS, block=block, max_pairs=max_pairs)
        assert [f.tolist() for f in found] == expected


# --------------------------------------------------------------------------- @UTM layout
def test_geo_folder_reader_and_names(tmp_path):
    expected = write_geo_dataset(tmp_path / "pitts30k" / "images" / "test")
    test_set = read_geo_folder(tmp_path / "pitts30k" / "images" / "test", name="pitts30k")
    assert_test_set(test_set, expected)
    assert test_set.queries_without_positives == 1 == sum(not p for p in expected["positives"])
    by_name = load_test_set("pitts30k_test", tmp_path)
    assert by_name.name == "pitts30k_test" and by_name.query_paths == test_set.query_paths
    assert load_test_set("pitts30k", tmp_path).positives[0].tolist() == test_set.positives[0].tolist()
    by_path = load_test_set(str(tmp_path / "pitts30k" / "images" / "test"))
    assert by_path.database_paths == test_set.database_paths
    wider = read_geo_folder(tmp_path / "pitts30k" / "images" / "test", radius=1000.0)
    assert wider.queries_without_positives == 0


def test_dataset_folder_of_the_downloader_layout_is_accepted(tmp_path):
    """The folder the README's layout is relative to (``<dataset>/images/test/...``), as --dataset or --root."""
    expected = write_geo_dataset(tmp_path / "pitts30k" / "images" / "test")
    assert_test_set(load_test_set(str(tmp_path / "pitts30k")), expected)
    assert_test_set(load_test_set("pitts30k_test", tmp_path / "pitts30k"), expected)
    assert_test_set(load_test_set("pitts30k", tmp_path / "pitts30k"), expected)
    write_geo_dataset(tmp_path / "msls" / "images" / "val")
    assert load_test_set(str(tmp_path / "msls")).num_queries == 7  # its only split
    write_geo_dataset(tmp_path / "msls" / "images" / "train")
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'val'\]; pass the one to evaluate"):
        load_test_set(str(tmp_path / "msls"))


def test_parse_utm_and_malformed_names(tmp_path):
    assert parse_utm("/x/@0585000.12@4477000.50@17@T@@.jpg") == (585000.12, 4477000.5)
    folder = tmp_path / "bad"
    write_image(folder / "database" / utm_name(1.0, 2.0))
    write_image(folder / "queries" / utm_name(1.0, 2.0))
    write_image(folder / "queries" / "IMG_0001.jpg")
    with pytest.raises(ValueError, match="IMG_0001.jpg"):
        read_geo_folder(folder)
    (folder / "queries" / "IMG_0001.jpg").unlink()
    write_image(folder / "queries" / "@east@north@.jpg")
    with pytest.raises(ValueError, match="@east@north@.jpg"):
        read_geo_folder(folder)


def test_geo_folder_missing_and_empty(tmp_path):
    write_image(tmp_path / "ds" / "database" / utm_name(1.0, 2.0))
    with pytest.raises(FileNotFoundError, match="queries"):
        read_geo_folder(tmp_path / "ds")
    (tmp_path / "ds" / "queries").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        read_geo_folder(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="tokyo247"):
        load_test_set("tokyo247", tmp_path)
    with pytest.raises(FileNotFoundError, match="a benchmark name needs --root"):
        load_test_set("tokyo247")
    with pytest.raises(ValueError, match="not a known dataset layout"):
        load_test_set(str(tmp_path))


def test_geo_folder_counts_every_image_extension_in_any_case(tmp_path):
    folder = tmp_path / "ds"
    suffixes = [".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG"]
    for i, suffix in enumerate(suffixes):  # places 100 m apart, the query at the .png one
        write_image(folder / "database" / (utm_name(100.0 * i, 0.0)[: -len(".jpg")] + suffix), seed=i)
    write_image(folder / "queries" / utm_name(400.0, 3.0))
    (folder / "database" / "notes.txt").write_text("not an image")
    (folder / "database" / "._hidden.jpg").write_bytes(b"resource fork")
    test_set = read_geo_folder(folder)
    assert sorted(p.suffix for p in test_set.database_paths) == sorted(suffixes)
    assert [test_set.database_paths[i].suffix for i in test_set.positives[0]] == [".png"]


def test_geo_folder_never_follows_a_symlink_loop(tmp_path):
    expected = write_geo_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "database" / "seq0" / "loop").symlink_to(tmp_path / "ds" / "database")
    (tmp_path / "ds" / "queries" / "self").symlink_to(".")
    linked = tmp_path / "elsewhere"
    write_image(linked / utm_name(585000.0, 4477000.0, note="linked"))
    (tmp_path / "ds" / "database" / "linked").symlink_to(linked)
    test_set = read_geo_folder(tmp_path / "ds")
    assert test_set.num_queries == len(expected["queries"])
    assert test_set.num_database == len(expected["database"]) + 1  # a linked folder is read, once
    assert sorted(p.name for p in test_set.database_paths) == sorted(
        [p.name for p in expected["database"]] + [utm_name(585000.0, 4477000.0, note="linked")]
    )


def test_test_set_validation():
    with pytest.raises(ValueError, match="no query images"):
        VPRTestSet("x", ["a.jpg"], [], [])
    with pytest.raises(ValueError, match="no database images"):
        VPRTestSet("x", [], ["q.jpg"], [[]])
    with pytest.raises(ValueError, match="outside"):
        VPRTestSet("x", ["a.jpg"], ["q.jpg"], [[1]])
    with pytest.raises(ValueError, match="positives for 2"):
        VPRTestSet("x", ["a.jpg"], ["q.jpg"], [[0], [0]])


# --------------------------------------------------------------------------- MSLS layout
def test_msls_reader(tmp_path):
    expected = write_msls(tmp_path / "msls")
    test_set = read_msls(tmp_path / "msls")
    assert_test_set(test_set, expected)
    assert test_set.excluded_queries == expected["excluded"] == 2
    assert test_set.queries_without_positives == 0
    by_name = load_test_set("msls_val", tmp_path)
    assert by_name.name == "msls_val" and by_name.query_paths == test_set.query_paths
    assert load_test_set(str(tmp_path / "msls")).database_paths == test_set.database_paths


def test_msls_bad_metadata(tmp_path):
    write_msls(tmp_path)
    post = tmp_path / "train_val" / "sf" / "query" / "postprocessed.csv"
    text = post.read_text()
    post.write_text(text.replace("northing", "north"))
    with pytest.raises(ValueError, match=r"sf/query/postprocessed.csv: missing column\(s\) \['northing'\]"):
        read_msls(tmp_path)
    post.write_text(text)
    raw = tmp_path / "train_val" / "cph" / "database" / "raw.csv"
    lines = raw.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",maybe"
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"cph/database/raw.csv, line 3: column 'pano' has invalid value 'maybe'"):
        read_msls(tmp_path)
    raw.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="raw.csv has .* rows but"):
        read_msls(tmp_path)
    with pytest.raises(FileNotFoundError, match="city folder"):
        read_msls(tmp_path, cities=("miami",))


def test_msls_missing_image(tmp_path):
    write_msls(tmp_path)
    image = tmp_path / "train_val" / "cph" / "query" / "images" / "cphq0x0.jpg"
    image.unlink()
    with pytest.raises(FileNotFoundError, match="cphq0x0.jpg"):
        read_msls(tmp_path)


# --------------------------------------------------------------------------- npy lists
@pytest.mark.parametrize(
    "name, folder, prefix, style",
    [
        ("nordland", "Nordland", "Nordland", "gt"),
        ("sped", "SPEDTEST", "SPED", "single"),
        ("pitts30k_test", "Pittsburgh", "pitts30k_test", "gt"),
        ("msls_val", "mapillary", "msls_val", "idx"),
    ],
)
def test_npy_lists_by_name(tmp_path, name, folder, prefix, style):
    expected = write_npy_lists(tmp_path / folder, prefix, style)
    test_set = load_test_set(name, tmp_path)
    assert test_set.name == name
    assert_test_set(test_set, expected)
    direct = read_npy_lists(tmp_path / folder, prefix)
    assert direct.query_paths == test_set.query_paths


def test_npy_lists_errors(tmp_path):
    folder = tmp_path / "Pittsburgh"
    write_npy_lists(folder, "pitts30k_test", "gt")
    write_npy_lists(folder, "pitts30k_val", "gt")
    with pytest.raises(ValueError, match="several image lists"):
        load_test_set(str(folder))
    assert load_test_set(str(folder / "pitts30k_val_dbImages.npy")).num_queries == 5
    np.save(folder / "pitts30k_test_gt.npy", np.array([[0]] * 3))
    with pytest.raises(ValueError, match="pitts30k_test_gt.npy has ground truth for 3 queries, expected 5"):
        read_npy_lists(folder, "pitts30k_test")
    np.save(folder / "pitts30k_test_gt.npy", np.array([[0]] * 4 + [[99]]))
    with pytest.raises(ValueError, match="query 4 .* point outside the 10 database images"):
        read_npy_lists(folder, "pitts30k_test")
    (folder / "ref" / "0000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0000003.jpg"):
        read_npy_lists(folder, "pitts30k_val")
    with pytest.raises(FileNotFoundError, match="missing_dbImages.npy"):
        read_npy_lists(folder, "missing")


def test_npy_lists_refuse_a_repeated_database_image_and_warn_on_a_repeated_query(tmp_path):
    folder = tmp_path / "lists"
    write_npy_lists(folder, "t", "gt")
    database = [f"ref/{i:07d}.jpg" for i in range(10)]
    np.save(folder / "t_dbImages.npy", np.array(database + ["ref/./0000004.jpg", database[7]]))
    with pytest.raises(ValueError, match=r"lists database images more than once \(2 repeats, first 'ref/0000004.jpg'\)"):
        read_npy_lists(folder, "t")
    np.save(folder / "t_dbImages.npy", np.array(database))
    np.save(folder / "t_qImages.npy", np.array([f"query/{i:07d}.jpg" for i in (0, 1, 2, 3, 1)]))
    with pytest.warns(UserWarning, match=r"t_qImages.npy: queries evaluated more than once \(1 repeats, first 'query/0000001.jpg'\)"):
        test_set = read_npy_lists(folder, "t")
    assert test_set.num_queries == 5  # counted as listed, as the official evaluation does
