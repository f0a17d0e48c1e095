"""PlaceIndex on random descriptors: exact search against brute force, approximate options,
stable ids, local features, atomic save/load and damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vprhub.pipelines import PlaceIndex
from vprhub.pipelines.index import MANIFEST_FILE, factory_string

DIM = 32


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return unit(rng, 500), unit(rng, 20)


def test_flat_search_is_exact(data):
    database, queries = data
    index = PlaceIndex(DIM)
    ids = index.add(database, [{"row": i} for i in range(len(database))])
    assert ids.tolist() == list(range(len(database)))
    scores, found = index.search(queries, 10)
    expected_scores, expected_ids = brute_force(database, queries, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert index.metadata(found[0, :2]) == [{"row": int(found[0, 0])}, {"row": int(found[0, 1])}]
    single_scores, single_ids = index.search(queries[0], 3)  # a single [D] query
    np.testing.assert_array_equal(single_ids, expected_ids[:1, :3])


@pytest.mark.parametrize("index_type", ["ivf", "pq", "ivfpq", "hnsw", "IVF4,Flat"])
def test_approximate_options_find_near_duplicates(index_type):
    rng = np.random.default_rng(1)
    database = unit(rng, 400)
    queries = database[:40] + 0.05 * unit(rng, 40)
    index = PlaceIndex(DIM, index_type=index_type)
    index.add(database)
    assert index.is_trained and len(index) == len(database)
    assert index.factory == factory_string(index_type, DIM, len(database))
    _, found = index.search(queries, 5)
    recall_at_5 = np.mean([i in row for i, row in enumerate(found)])
    assert recall_at_5 >= 0.9, (index.factory, recall_at_5)


def test_factory_strings():
    assert factory_string("flat", 8448, 100_000) == "Flat"
    assert factory_string("ivf", 8448, 100_000) == "IVF1265,Flat"  # 4 sqrt(N)
    assert factory_string("ivf", 8448, 100) == "IVF2,Flat"  # >= 39 training points per list
    assert factory_string("ivfpq", 8448, 100_000) == "IVF1265,PQ64x8np"
    assert factory_string("pq", 32, 100) == "PQ8x6np"  # dsub >= 4, 2**nbits <= N
    with pytest.raises(ValueError, match="unknown index type 'bogus'"):
        factory_string("bogus", 8, 10)


def test_search_parameters_reach_faiss():
    rng = np.random.default_rng(2)
    index = PlaceIndex(DIM, index_type="ivf", search_params={"nprobe": 3})
    index.add(unit(rng, 500))
    import faiss

    assert faiss.extract_index_ivf(index._store.index).nprobe == 3
    index.set_search_params(nprobe=5)
    assert faiss.extract_index_ivf(index._store.index).nprobe == 5
    with pytest.raises(ValueError, match="efSearch"):
        index.set_search_params(efSearch=10)


def test_add_and_remove_keep_ids_stable(data):
    database, queries = data
    index = PlaceIndex(DIM)
    index.add(database[:300], [{"row": i} for i in range(300)])
    new_ids = index.add(database[300:], [{"row": i} for i in range(300, 500)])
    assert new_ids.tolist() == list(range(300, 500))
    removed = [0, 7, 450]
    index.remove(removed)
    assert len(index) == 497 and not set(removed) & set(index.ids.tolist())
    keep = np.setdiff1d(np.arange(500), removed)
    scores, found = index.search(queries, 5)
    _, expected = brute_force(database[keep], queries, 5)
    np.testing.assert_array_equal(found, keep[expected])  # ids, not positions
    assert index.metadata([found[0, 0]]) == [{"row": int(found[0, 0])}]
    later = index.add(database[:1])
    assert later.tolist() == [500]  # ids are never reused
    with pytest.raises(KeyError, match="no entry with id 7"):
        index.remove([7])


def test_hnsw_refuses_remove(data):
    index = PlaceIndex(DIM, index_type="hnsw")
    index.add(data[0])
    with pytest.raises(ValueError, match="cannot remove entries"):
        index.remove([1])


def test_bad_queries_and_sizes(data):
    database, queries = data
    index = PlaceIndex(DIM)
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(queries, 1)
    index.add(database[:4])
    scores, ids = index.search(queries, 100)  # clamped to the 4 entries
    assert ids.shape == (len(queries), 4) and sorted(ids[0].tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(scores, np.sort(queries @ database[:4].T, axis=1)[:, ::-1], atol=1e-5)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match=r"must have shape \[N, 32\]"):
        index.search(np.zeros((2, 16), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match="got 1 metadata rows for 2 descriptors"):
        index.add(database[:2], [{}])
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        index.add(database[:1], [{"x": object()}])


def test_local_features_follow_ids():
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((6, 3, 4, 5)).astype(np.float32)
    index = PlaceIndex(DIM)
    index.add(unit(rng, 4), local_features=maps[:4])
    index.remove([1])
    index.add(unit(rng, 2), local_features=maps[4:])
    np.testing.assert_array_equal(index.local_features.get([5, 0, 3]), maps[[5, 0, 3]].astype(np.float16))
    with pytest.raises(KeyError, match=r"\[1\]"):
        index.local_features.get([1])
    with pytest.raises(ValueError, match="pass local_features too"):
        index.add(unit(rng, 1))
    with pytest.raises(ValueError, match=r"shape \[N, 3, 4, 5\]"):
        index.add(unit(rng, 1), local_features=maps[:1, :2])
    plain = PlaceIndex(DIM)
    plain.add(unit(rng, 1))
    with pytest.raises(ValueError, match="keeps no local features"):
        plain.add(unit(rng, 1), local_features=maps[:1])


@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, data, index_type):
    database, queries = data
    rng = np.random.default_rng(4)
    maps = rng.standard_normal((len(database), 2, 2, 3)).astype(np.float32)
    identity = {"name_or_path": "m", "model_type": "salad", "config_hash": "abc", "descriptor_dim": DIM}
    index = PlaceIndex(DIM, index_type=index_type, identity=identity)
    index.add(database, [{"path": f"{i}.jpg", "utm": [i, -i]} for i in range(len(database))], maps)
    index.remove([3])
    index.build_report = {"images": 501, "indexed": 500, "skipped": [{"input": "x", "error": "y"}]}
    index.save(tmp_path / "map.vprindex")
    loaded = PlaceIndex.load(tmp_path / "map.vprindex")
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    assert loaded.identity == identity and loaded.build_report == index.build_report
    assert loaded.search_params == index.search_params and loaded.factory == index.factory
    assert loaded.metadata([4]) == [{"path": "4.jpg", "utm": [4, -4]}]
    np.testing.assert_array_equal(loaded.local_features.get([0, 499]), index.local_features.get([0, 499]))
    assert loaded.add(database[:1], local_features=maps[:1]).tolist() == [500]
    with pytest.raises(FileExistsError):
        loaded.save(tmp_path / "map.vprindex")
    loaded.save(tmp_path / "map.vprindex", overwrite=True)  # over the folder its features are mapped from
    assert len(PlaceIndex.load(tmp_path / "map.vprindex")) == 500


def test_damaged_index_is_refused_and_not_overwritten(tmp_path, data):
    index = PlaceIndex(DIM)
    index.add(data[0])
    path = tmp_path / "map.vprindex"
    index.save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    faiss_file = path / "index.faiss"
    faiss_file.write_bytes(before["index.faiss"][:1000])
    with pytest.raises(ValueError, match="damaged index .*index.faiss has 1000 bytes"):
        PlaceIndex.load(path)
    manifest = json.loads(before[MANIFEST_FILE])
    manifest["files"]["index.faiss"] = 1000  # sizes agree, content truncated
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="damaged index .*cannot read index.faiss"):
        PlaceIndex.load(path)
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse vprindex.json"):
        PlaceIndex.load(path)
    with pytest.raises(ValueError, match="not a vprhub place index"):
        PlaceIndex.load(tmp_path)

    for name, content in before.items():
        (path / name).write_bytes(content)
    lines = before["entries.jsonl"].splitlines(keepends=True)
    (path / "entries.jsonl").write_bytes(b"".join(lines[:-1]) + b"x" * len(lines[-1]))
    with pytest.raises(ValueError, match="entries.jsonl does not match its checksum"):
        PlaceIndex.load(path)

    # a failed save leaves the previous folder untouched
    (path / "entries.jsonl").write_bytes(before["entries.jsonl"])
    bad = PlaceIndex(DIM)
    bad.add(data[0][:2], [{"x": 1}, {"x": 2}])
    bad._store.rows[0] = {"x": object()}  # not JSON-able: fails mid-save
    with pytest.raises(TypeError):
        bad.save(path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.vprindex"]


def test_compatibility_check():
    identity = {
        "name_or_path": "a",
        "model_type": "salad",
        "config_hash": "h1",
        "descriptor_dim": DIM,
        "image_processor": {"size": {"height": 224, "width": 224}},
        "probe": [[1.0, 0.0], [0.0, 1.0]],
    }
    index = PlaceIndex(DIM, identity=identity)
    index.check_compatible(dict(identity, name_or_path="moved/a"))  # a moved model is the same model
    with pytest.raises(ValueError, match="descriptor dimension mismatch.*32.*64"):
        index.check_compatible(dict(identity, descriptor_dim=64))
    with pytest.raises(ValueError, match="model configuration differs"):
        index.check_compatible(dict(identity, config_hash="h2"))
    with pytest.raises(ValueError, match=r"image processor differs in \['size'\]"):
        index.check_compatible(dict(identity, image_processor={"size": {"height": 322, "width": 322}}))
    with pytest.raises(ValueError, match="different weights"):
        index.check_compatible(dict(identity, probe=[[0.0, 1.0], [0.0, 1.0]]))
    PlaceIndex(DIM).check_compatible(identity)  # an index of bare descriptors only checks the width


def _rewrite_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def _sha(file) -> str:
    import hashlib

    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_same_size_corruption_and_inconsistent_ids_are_refused(tmp_path, data):
    database, _ = data
    index = PlaceIndex(DIM)
    index.add(database[:10], [{"row": i} for i in range(10)], np.zeros((10, 1, 1, 2), np.float32))
    path = tmp_path / "map.vprindex"
    index.save(path)
    faiss_file = path / "index.faiss"
    original = faiss_file.read_bytes()
    flipped = bytearray(original)
    flipped[-100] ^= 0xFF  # one byte of a stored vector: same size, wrong hits
    faiss_file.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="index.faiss does not match its checksum"):
        PlaceIndex.load(path)
    faiss_file.write_bytes(original)

    # entries that name other ids than the faiss index (checksums made to agree)
    entries = path / "entries.jsonl"
    lines = entries.read_text().splitlines()
    lines[3] = json.dumps({"id": 99, "metadata": {"row": 3}})
    entries.write_text("\n".join(lines) + "\n")
    files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    files["entries.jsonl"] = {"bytes": entries.stat().st_size, "sha256": _sha(entries)}
    _rewrite_manifest(path, files=files)
    with pytest.raises(ValueError, match="ids of index.faiss .* and entries.jsonl .* disagree"):
        PlaceIndex.load(path)

    # local features for other ids
    index.save(path, overwrite=True)
    local_ids = path / "local_ids.npy"
    np.save(local_ids, np.arange(1, 11))
    files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    files["local_ids.npy"] = {"bytes": local_ids.stat().st_size, "sha256": _sha(local_ids)}
    _rewrite_manifest(path, files=files)
    with pytest.raises(ValueError, match="ids of the local features and of the entries disagree"):
        PlaceIndex.load(path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"files": ["index.faiss"]}, "files"),
        ({"files": None}, "files"),
        ({"files": {"index.faiss": {"sha256": "0" * 64}}}, "files"),
        ({"files": {"index.faiss": "1000"}}, "files"),
        ({"files": {"../index.faiss": 1000}}, "files"),
        ({"next_id": None}, "next_id"),
        ({"identity": "a model"}, "identity"),
        ({"identity": {"probe": "x"}}, "identity"),
        ({"build_report": {"batch_size": "8"}}, "build_report"),
        ({"search_params": {"nprobe": "x"}}, "search_params"),
        ({"search_params": [1]}, "search_params"),
        ({"format_version": "2"}, "format_version"),
        ({"dim": "abc"}, "dim"),
        ({"dim": float("nan")}, "dim"),
        ({"num_entries": "4"}, "num_entries"),
        ({"local_features": "float64"}, "local_features"),
    ],
)
def test_hand_edited_manifest_is_refused_naming_file_and_field(tmp_path, data, change, field):
    index = PlaceIndex(DIM)
    index.add(data[0][:4])
    path = tmp_path / "map.vprindex"
    index.save(path)
    _rewrite_manifest(path, **change)
    with pytest.raises(ValueError, match=rf"damaged index manifest .*map.vprindex/vprindex.json: '{field}' must be"):
        PlaceIndex.load(path)


@pytest.mark.parametrize("field", ["identity", "build_report", "next_id", "search_params"])
def test_manifest_without_a_field_is_refused(tmp_path, data, field):
    index = PlaceIndex(DIM)
    index.add(data[0][:4])
    path = tmp_path / "map.vprindex"
    index.save(path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    del manifest[field]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"vprindex.json: it lacks \['{field}'\]"):
        PlaceIndex.load(path)


def test_missing_index_is_reported_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="index .*nope.vprindex does not exist"):
        PlaceIndex.load(tmp_path / "nope.vprindex")


def test_lowered_next_id_never_reuses_ids(tmp_path, data):
    index = PlaceIndex(DIM)
    index.add(data[0][:5], [{"row": i} for i in range(5)])
    path = tmp_path / "map.vprindex"
    index.save(path)
    _rewrite_manifest(path, next_id=2)
    loaded = PlaceIndex.load(path)
    assert loaded.add(data[0][5:6], [{"row": 5}]).tolist() == [5]
    assert loaded.metadata([2, 5]) == [{"row": 2}, {"row": 5}]


def test_metadata_is_standard_json_and_keeps_types(tmp_path, data):
    index = PlaceIndex(DIM)
    with pytest.raises(ValueError, match=r"metadata row 0\['lat'\] is nan: not valid JSON; use None"):
        index.add(data[0][:1], [{"lat": float("nan")}])
    with pytest.raises(ValueError, match=r"metadata row 1\['gps'\]\[0\] is inf"):
        index.add(data[0][:2], [{}, {"gps": [float("inf"), 0.0]}])
    with pytest.raises(ValueError, match="keys must be strings .* got 1"):
        index.add(data[0][:1], [{1: "a"}])
    assert len(index) == 0  # refused before anything was added
    rows = [{"zip": "02134", "n": 2**62, "ok": True, "none": None, "nested": {"a": [1, 2.5, "x"]}}]
    index.add(data[0][:1], rows)
    index.save(tmp_path / "m.vprindex")
    assert PlaceIndex.load(tmp_path / "m.vprindex").metadata([0]) == rows
    text = (tmp_path / "m.vprindex" / "entries.jsonl").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))["metadata"] == rows[0]


def test_metadata_filters_and_geographic_prior(data):
    database, queries = data
    rng = np.random.default_rng(5)
    lat = 59.9 + rng.uniform(-0.01, 0.01, len(database))
    lon = 10.7 + rng.uniform(-0.02, 0.02, len(database))
    rows = [
        {"zip": ["02134", "2134"][i % 2], "lat": float(a), "lon": float(b)} if i % 5 else {"zip": "02134"}
        for i, (a, b) in enumerate(zip(lat, lon))
    ]
    index = PlaceIndex(DIM)
    index.add(database, rows)
    scores, found = index.search(queries, 5, where={"zip": "02134"})
    keep = np.flatnonzero([r["zip"] == "02134" for r in rows])  # the string, never the number 2134
    expected_scores, expected = brute_force(database[keep], queries, 5)
    np.testing.assert_array_equal(found, keep[expected])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)

    # within 500 m of a point: haversine by hand, brute force over those entries
    near = (59.9, 10.7)
    phi0, phi, dlon = np.radians(near[0]), np.radians(lat), np.radians(lon - near[1])
    metres = 6_371_008.8 * 2 * np.arcsin(
        np.sqrt(np.sin((phi - phi0) / 2) ** 2 + np.cos(phi0) * np.cos(phi) * np.sin(dlon / 2) ** 2)
    )
    inside = np.flatnonzero((metres <= 500) & (np.arange(len(database)) % 5 != 0))
    assert 5 < len(inside) < 200
    scores, found = index.search(queries, 5, near=near, radius_m=500)
    _, expected = brute_force(database[inside], queries, 5)
    np.testing.assert_array_equal(found, inside[expected])
    # fewer matches than top_k: padded with -1 / -inf
    few = inside[:2]
    scores, found = index.search(queries[:1], 4, where={"zip": [rows[i]["zip"] for i in few]}, near=near, radius_m=500)
    assert set(found[0, found[0] >= 0].tolist()) <= set(inside.tolist()) and (found[0] >= 0).sum() >= 2
    scores, found = index.search(queries[:1], 3, near=(0.0, 0.0), radius_m=10)
    assert found.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()
    with pytest.raises(ValueError, match="not a latitude, longitude pair"):
        index.search(queries, 1, near=(100.0, 0.0), radius_m=5)
    with pytest.raises(ValueError, match="radius_m must be a positive number"):
        index.search(queries, 1, near=(1.0, 0.0), radius_m=-5)
    with pytest.raises(ValueError, match="metadata filter keys must be non-empty strings"):
        index.search(queries, 1, where={1: "a"})


def test_filters_on_approximate_and_utm(data):
    database, queries = data
    rows = [{"utm_east": 500_000.0 + 10 * i, "utm_north": 4_500_000.0} for i in range(len(database))]
    for index_type in ("ivf", "hnsw"):
        index = PlaceIndex(DIM, index_type=index_type)
        index.add(database, rows)
        _, found = index.search(queries, 3, near=(500_000.0, 4_500_000.0), radius_m=95,
                                coordinate_keys=("utm_east", "utm_north"))
        assert set(found[found >= 0].tolist()) <= set(range(10)), index_type  # entries 0..9 lie within 95 m


def test_filters_on_metadata_no_entry_has_are_errors(data):
    database, queries = data
    index = PlaceIndex(DIM)
    index.add(database[:12], [{"path": f"img{i:02d}.jpg", "city": "Oslo"} for i in range(12)])
    with pytest.raises(ValueError, match=r"no entry of the index has the metadata key \['lat', 'lon'\]"):
        index.search(queries, 5, near=(59.9, 10.7), radius_m=500)
    with pytest.raises(ValueError, match=r"no entry of the index has the metadata key \['zip'\]"):
        index.search(queries, 5, where={"zip": "02134"})
    _, found = index.search(queries[:1], 3, where={"city": "Bergen"})  # a known key, no match: empty, no error
    assert found.tolist() == [[-1, -1, -1]]
    # top_k above the entries is clamped, with a filter too
    scores, found = index.search(queries[:2], 100, where={"city": "Oslo"})
    expected_scores, expected = brute_force(database[:12], queries[:2], 12)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
