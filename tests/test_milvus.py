"""The Milvus backend against a real milvus-lite engine (no mock): the same hits and scores as
faiss flat, add / remove / filters / geographic prior, reopen after a restart, model and
dimension checks before any write, a resumed build after a kill, and unreachable URIs.

milvus-lite 3 runs in process and starts in well under a second; the module shares one
database (one collection per test)."""

from __future__ import annotations

import numpy as np
import pytest

from vprhub.pipelines import PlaceIndex

DIM = 48
IDENTITY = {"name_or_path": "m", "model_type": "salad", "config_hash": "abc", "descriptor_dim": DIM,
            "image_processor": {"size": 56}, "probe": [[1.0, 0.0, 0.5]]}


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "map.db")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    database, queries = unit(rng, 300), unit(rng, 25)
    rows = [{"path": f"img/{i:05d}.jpg", "zip": ["02134", "2134"][i % 2], "lat": 45.0 + i * 1e-4, "lon": 7.0}
            for i in range(len(database))]
    rows[7]["zip"] = 2134  # a number, not the string
    return database, queries, rows


def test_exact_search_matches_faiss_and_survives_restart(uri, data):
    database, queries, rows = data
    milvus = PlaceIndex(DIM, identity=IDENTITY, backend="milvus", uri=uri, collection="parity")
    faiss_index = PlaceIndex(DIM, identity=IDENTITY)
    for index in (milvus, faiss_index):
        assert index.add(database[:200], rows[:200]).tolist() == list(range(200))
        assert index.add(database[200:], rows[200:]).tolist() == list(range(200, 300))
        index.remove([3, 150])
    assert len(milvus) == 298 and milvus.ids.tolist() == faiss_index.ids.tolist()
    expected_scores, expected_ids = faiss_index.search(queries, 10)
    scores, ids = milvus.search(queries, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert milvus.metadata([7, 8]) == [rows[7], rows[8]] and isinstance(milvus.metadata([7])[0]["zip"], int)

    # metadata filter, type-strict: "02134" is not 2134
    for where in ({"zip": "2134"}, {"zip": ["02134", 2134]}):
        np.testing.assert_array_equal(milvus.search(queries, 5, where=where)[1],
                                      faiss_index.search(queries, 5, where=where)[1])
    # geographic prior: same entries in both backends
    geo = dict(near=(45.005, 7.0), radius_m=300)
    s_m, i_m = milvus.search(queries, 8, **geo)
    s_f, i_f = faiss_index.search(queries, 8, **geo)
    np.testing.assert_array_equal(i_m, i_f)
    np.testing.assert_allclose(s_m, s_f, atol=1e-5)
    assert (i_f >= 0).all() and all(abs(rows[i]["lat"] - 45.005) < 0.0028 for i in i_f.ravel())

    # a restart: the engine is stopped (its file released) and the collection reopened by URI
    milvus.close()
    reopened = PlaceIndex.load(uri, collection="parity")
    scores, ids = reopened.search(queries, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert reopened.next_id == 300 and reopened.identity == IDENTITY and len(reopened) == 298
    assert reopened.add(database[:1], rows[:1]).tolist() == [300]


def test_mismatch_refused_before_writing(uri, data):
    database, _, rows = data
    index = PlaceIndex(DIM, identity=IDENTITY, backend="milvus", uri=uri, collection="guarded")
    index.add(database[:5], rows[:5])
    with pytest.raises(ValueError, match="dimension mismatch.*48-d descriptors, not 64-d"):
        PlaceIndex(64, backend="milvus", uri=uri, collection="guarded")
    with pytest.raises(ValueError, match="model configuration differs"):
        PlaceIndex(DIM, identity=dict(IDENTITY, config_hash="other"), backend="milvus", uri=uri, collection="guarded")
    reopened = PlaceIndex.load(uri, collection="guarded")
    assert len(reopened) == 5 and reopened.metadata([4]) == [rows[4]]
    with pytest.raises(ValueError, match=r"must have shape \[N, 48\]"):
        reopened.add(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="the milvus backend keeps no local features"):
        reopened.add(database[:1], local_features=np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="nan: not valid JSON"):
        reopened.add(database[:1], [{"x": float("nan")}])
    assert len(reopened) == 5
    with pytest.raises(ValueError, match="no collection 'absent'"):
        PlaceIndex.load(uri, collection="absent")


def test_killed_build_leaves_a_consistent_collection(uri, data):
    """Entries written after the manifest's last update (a build killed between the two) are
    kept; the reopened index never reuses their ids, and upserting them again is idempotent."""
    database, _, rows = data
    index = PlaceIndex(DIM, identity=IDENTITY, backend="milvus", uri=uri, collection="killed")
    index.add(database[:10], rows[:10])
    index._store.upsert(np.arange(10, 14), database[10:14], rows[10:14])  # the kill: no manifest update
    resumed = PlaceIndex.load(uri, collection="killed")
    assert len(resumed) == 14 and resumed.next_id == 14
    resumed._store.upsert(np.arange(10, 14), database[10:14], rows[10:14])  # sent twice: no duplicates
    assert resumed.add(database[14:16], rows[14:16]).tolist() == [14, 15]
    assert len(resumed) == 16 and resumed.ids.tolist() == list(range(16))


def test_unreachable_or_wrong_uri_is_named():
    with pytest.raises(ValueError, match="cannot reach Milvus at http://127.0.0.1:9"):
        PlaceIndex(DIM, backend="milvus", uri="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="needs uri="):
        PlaceIndex(DIM, backend="milvus")
    with pytest.raises(ValueError, match="index_type 'ivf' is faiss-only"):
        PlaceIndex(DIM, index_type="ivf", backend="milvus", uri="x.db")
