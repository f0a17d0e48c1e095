"""The place-recognition pipeline with tiny random models: input kinds, batching, index
building with bad files, hits, save/load, model mismatch, SelaVPR re-ranking, plots, CLI."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

import vprhub
from parity import load_expected, load_manifest, local_sim_maps
from vprhub.cli import main
from vprhub.data.synthetic import SyntheticPlaces
from vprhub.modeling.local_matching import rerank
from vprhub.pipelines import PlaceIndex, PlaceRecognitionPipeline, build_index, plot_matches, register_pipeline
from vprhub.pipelines.plotting import FRAME, GAP, TILE

SIZE = [112, 112]


def tiny(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return vprhub.build_model(model_type, image_size=overrides.pop("image_size", SIZE), **overrides)


def save_model(model, folder, size=SIZE):
    model.save_pretrained(folder)
    vprhub.vpr_image_processor(*size).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def salad_dir(tmp_path_factory):
    register_pipeline()
    return save_model(tiny("salad"), tmp_path_factory.mktemp("salad"))


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Database (2 views of 4 places) and queries (1 other view each) as jpg files."""
    root = tmp_path_factory.mktemp("places")
    database = SyntheticPlaces(num_places=4, views_per_place=2, image_size=96, seed=3)
    queries = SyntheticPlaces(num_places=4, views_per_place=1, image_size=96, seed=3, first_view=7)
    return database.save_images(root / "db"), queries.save_images(root / "q"), database.labels


@pytest.fixture(scope="module")
def salad(salad_dir):
    return pipeline("place-recognition", model=salad_dir)


def direct_descriptors(pipe, images) -> np.ndarray:
    """Descriptors computed without the pipeline: image processor + model, one batch."""
    processor = vprhub.vpr_image_processor(*SIZE)
    pixels = processor([Image.open(i).convert("RGB") if isinstance(i, str) else i for i in images], return_tensors="pt")
    with torch.no_grad():
        return pipe.model.eval()(pixels["pixel_values"]).descriptors.numpy()


@pytest.fixture
def http_folder(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_input_kind_gives_the_same_descriptor(salad, salad_dir, http_folder):
    assert isinstance(salad, PlaceRecognitionPipeline)
    assert salad.image_processor.to_dict()["size"] == AutoImageProcessor.from_pretrained(salad_dir).size
    folder, url = http_folder
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    inputs = [
        str(folder / "a.png"),
        folder / "a.png",
        f"{url}/a.png",
        Image.fromarray(pixels),
        pixels,
        pixels.transpose(2, 0, 1) / 255.0,  # CHW float in [0, 1]
    ]
    outputs = salad(inputs, batch_size=4)
    expected = direct_descriptors(salad, [Image.fromarray(pixels)])[0]
    assert len(outputs) == len(inputs)
    for out in outputs:
        assert out.dtype == np.float32 and out.shape == (salad.model.config.descriptor_dim,)
        np.testing.assert_allclose(out, expected, atol=1e-5)
    single = salad(pixels)
    assert isinstance(single, np.ndarray)
    np.testing.assert_allclose(single, expected, atol=1e-5)
    gray = salad(pixels.mean(-1).astype(np.uint8))
    assert gray.shape == expected.shape


def test_dtype_and_device(salad_dir, salad, places):
    half = pipeline("place-recognition", model=salad_dir, dtype=torch.bfloat16, device="cpu")
    assert half.model.dtype == torch.bfloat16 and half.device.type == "cpu"
    a, b = np.stack(salad(places[0][:3])), np.stack(half(places[0][:3]))
    assert b.dtype == np.float32
    assert (np.sum(a * b, 1) > 0.999).all()
    index = build_index(salad, places[0], progress=False)
    assert half(places[0][0], index=index, top_k=1)[0]["index"] == 0  # bf16 queries are the same model


def test_bad_query_inputs_name_the_problem(salad, tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), "red").save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="image file not found: .*missing.jpg"):
        salad(str(tmp_path / "missing.jpg"))
    for bad in (truncated, text):
        with pytest.raises(ValueError, match=f"cannot read image .*{bad.name}"):
            salad([str(good), str(bad)])
    with pytest.raises(ValueError, match="unsupported image input of type int"):
        salad(3)
    with pytest.raises(ValueError, match=r"got shape \(4, 5, 6, 7\)"):
        salad(np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        salad(np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match="no images given"):
        salad([])
    with pytest.raises(ValueError, match="produce no local features"):
        salad(str(good), return_local_features=True)


def test_build_skips_unreadable_files_and_hits_match_brute_force(salad, places, tmp_path):
    database, queries, labels = places
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(database[0].read_bytes()[:300])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    files = [database[0], truncated, *database[1:4], empty, *database[4:], text]
    rows = [{"place": int(p)} for p in labels[:1]] + [{}] + [{"place": int(p)} for p in labels[1:4]] + [{}]
    rows += [{"place": int(p)} for p in labels[4:]] + [{}]
    with pytest.warns(UserWarning, match="skipping") as caught:
        index = build_index(salad, files, metadata=rows, batch_size=3, progress=False)
    assert len(caught) == 3
    report = index.build_report
    assert report["images"] == 11 and report["indexed"] == 8 and report["batch_size"] == 3
    assert [s["input"] for s in report["skipped"]] == [str(truncated), str(empty), str(text)]
    assert index.metadata([0, 7]) == [
        {"path": str(database[0]), "place": int(labels[0])},
        {"path": str(database[7]), "place": int(labels[7])},
    ]

    db = direct_descriptors(salad, [str(p) for p in database])
    q = direct_descriptors(salad, [str(p) for p in queries])
    expected = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :3]
    results = salad([str(p) for p in queries], index=index, top_k=3, batch_size=2)
    for hits, row, query in zip(results, expected, q):
        assert [h["index"] for h in hits] == row.tolist()
        np.testing.assert_allclose([h["score"] for h in hits], db[row] @ query, atol=1e-5)
        assert hits[0]["metadata"]["path"] == str(database[row[0]])
    everything = np.argsort(-(q[0] @ db.T), kind="stable")
    assert [h["index"] for h in salad(str(queries[0]), index=index, top_k=9)] == everything.tolist()  # all 8
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        salad(str(queries[0]), index=index, top_k=0)
    with pytest.raises(ValueError, match="no readable image among the 2 inputs"):
        build_index(salad, [empty, text], progress=False)


def test_pipeline_of_a_saved_folder_asks_nothing(salad_dir, monkeypatch):
    """No "run the custom code? [y/N]" prompt (a 15 s stall in a terminal): vprhub's classes are used."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    recognizer = pipeline("place-recognition", model=salad_dir)
    assert asked == [] and type(recognizer.image_processor) is vprhub.VPRImageProcessor


def test_pipeline_defaults_apply_and_search_options_need_an_index(salad, salad_dir, places):
    """Options given to pipeline(...) apply to every call (a call's own win); top_k without index is an error."""
    database, queries, _ = places
    index = build_index(salad, [str(p) for p in database], progress=False)
    searcher = pipeline("place-recognition", model=salad_dir, top_k=2)
    assert [len(hits) for hits in searcher([str(q) for q in queries[:2]], index=index)] == [2, 2]
    assert len(searcher(str(queries[0]), index=index, top_k=5)) == 5
    with pytest.raises(ValueError, match=r"search options \(top_k\) need index="):
        salad(str(queries[0]), top_k=3)
    with pytest.raises(ValueError, match=r"search options \(top_k\)"):
        searcher(str(queries[0]))


def test_build_index_records_absolute_paths(salad, places, monkeypatch):
    database, _, _ = places
    monkeypatch.chdir(database[0].parent)
    relative = [p.name for p in database[:2]]
    index = build_index(salad, relative, progress=False)
    assert [m["path"] for m in index.metadata(index.ids)] == [str(p) for p in database[:2]]


def test_save_load_gives_identical_hits_and_refuses_other_models(salad, places, tmp_path):
    database, queries, _ = places
    index = build_index(salad, database, batch_size=4, progress=False)
    index.save(tmp_path / "map.vprindex")
    loaded = PlaceIndex.load(tmp_path / "map.vprindex")
    assert loaded.identity["name_or_path"] == salad.model.name_or_path
    query_list = [str(p) for p in queries]
    assert salad(query_list, index=loaded, top_k=4) == salad(query_list, index=index, top_k=4)

    other_weights = PlaceRecognitionPipeline(model=tiny("salad", seed=1))
    with pytest.raises(ValueError, match="same configuration but different weights"):
        other_weights(query_list[0], index=loaded)
    other_width = PlaceRecognitionPipeline(model=tiny("salad", num_clusters=4))
    with pytest.raises(ValueError, match="descriptor dimension mismatch"):
        other_width(query_list[0], index=loaded)
    other_config = PlaceRecognitionPipeline(model=tiny("salad", sinkhorn_iterations=5))
    with pytest.raises(ValueError, match="model configuration differs"):
        other_config(query_list[0], index=loaded)
    other_size = PlaceRecognitionPipeline(model=salad.model, image_processor=vprhub.vpr_image_processor(84, 84))
    with pytest.raises(ValueError, match=r"preprocessing mismatch.*\['size'\]"):
        other_size(query_list[0], index=loaded)
    other_model = PlaceRecognitionPipeline(model=tiny("cricavpr", batch_mode="independent", encoder_num_heads=4))
    bare = PlaceIndex(other_model.descriptor_dim, identity=loaded.identity | {"descriptor_dim": None})
    bare.add(np.eye(other_model.descriptor_dim, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="model type differs"):
        other_model(query_list[0], index=bare)


def test_cricavpr_batches_consecutively_at_index_and_query_time(places):
    pipe = PlaceRecognitionPipeline(model=tiny("cricavpr", encoder_num_heads=4))
    assert pipe.batch_dependent
    images = [str(p) for p in places[0][:5]]
    with torch.no_grad():
        pixels = vprhub.vpr_image_processor(*SIZE)([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
        expected = torch.cat([pipe.model(chunk).descriptors for chunk in pixels.split(2)]).numpy()
    np.testing.assert_allclose(np.stack(pipe(images, batch_size=2)), expected, atol=1e-5)
    assert not np.allclose(np.stack(pipe(images, batch_size=5)), expected, atol=1e-3)  # it is batch-dependent

    index = build_index(pipe, images, batch_size=2, progress=False)
    same_batches = pipe(images, index=index, top_k=1)  # batch size taken from the index
    assert [h[0]["index"] for h in same_batches] == list(range(5))
    np.testing.assert_allclose([h[0]["score"] for h in same_batches], 1.0, atol=1e-5)
    other_batches = pipe(images, index=index, top_k=1, batch_size=5)
    assert min(h[0]["score"] for h in other_batches) < 0.9999


def test_rerank_follows_the_official_selavpr_rule():
    """The parity fixture's isolated case: query R0 against R0, R1, R2, E0, stored in the
    index in the reverse global order; re-ranking must give the official order and scores."""
    manifest = load_manifest("selavpr")
    expected = load_expected("selavpr")
    r0, r1, r2, e0 = local_sim_maps(manifest)
    pipe = PlaceRecognitionPipeline(model=tiny("selavpr"))
    dim = pipe.descriptor_dim
    # global similarity to the query: E0 > E0' > R2 > R1 > R0 (descending with the id)
    angles = np.linspace(0.1, 1.0, 5)
    descriptors = np.zeros((5, dim), np.float32)
    descriptors[:, 0], descriptors[:, 1] = np.cos(angles), np.sin(angles)
    maps = torch.stack([e0, e0, r2, r1, r0]).numpy()
    index = PlaceIndex(dim)
    index.add(descriptors, [{"name": n} for n in ("E0", "E0'", "R2", "R1", "R0")], maps)
    query = {"descriptors": torch.eye(dim)[:1], "local_features": r0[None]}
    hits = pipe.postprocess(query, index=index, top_k=5, rerank=True, rerank_candidates=5)
    official = {"R0": 0, "R1": 1, "R2": 2, "E0": 3}
    order = [official[n] for n in ("R0", "R1", "R2", "E0")]
    assert order == expected["local_sim.rerank_order_isolated"].tolist()
    assert [h["metadata"]["name"] for h in hits] == ["R0", "R1", "R2", "E0", "E0'"]  # tie kept in global order
    scores = expected["local_sim.scores_isolated"].tolist()
    assert [h["rerank_score"] for h in hits] == [scores[0], scores[1], scores[2], scores[3], scores[3]]
    np.testing.assert_allclose([h["score"] for h in hits], np.cos(angles[[4, 3, 2, 0, 1]]), atol=1e-6)
    # only the rerank_candidates best global hits are re-ranked
    top2 = pipe.postprocess(query, index=index, top_k=2, rerank=True, rerank_candidates=3)
    assert [h["metadata"]["name"] for h in top2] == ["R2", "E0"]
    with pytest.raises(ValueError, match="top_k=4 is larger than rerank_candidates=3"):
        pipe.postprocess(query, index=index, top_k=4, rerank=True, rerank_candidates=3)


def test_rerank_end_to_end_and_plots(places, tmp_path):
    database, queries, labels = places
    pipe = PlaceRecognitionPipeline(model=tiny("selavpr"))
    index = build_index(pipe, database, metadata=[{"place": int(p)} for p in labels], batch_size=4, progress=False)
    assert index.local_features is not None and len(index.local_features) == len(database)
    index.save(tmp_path / "sela.vprindex")
    index = PlaceIndex.load(tmp_path / "sela.vprindex")

    query = str(queries[1])
    hits = pipe(query, index=index, top_k=3, rerank=True, rerank_candidates=6, return_correspondences=True)
    plain = pipe(query, index=index, top_k=6)
    candidate_ids = [h["index"] for h in plain]
    query_local = torch.from_numpy(pipe(query, return_local_features=True)["local_features"])
    stored = pipe([str(database[i]) for i in candidate_ids], return_local_features=True, batch_size=4)
    candidates = torch.from_numpy(np.stack([s["local_features"] for s in stored]).astype(np.float16))
    order, scores = rerank(query_local, candidates)
    assert [h["index"] for h in hits] == [candidate_ids[i] for i in order[:3]]
    assert [h["rerank_score"] for h in hits] == scores[order[:3]].tolist()
    for hit in hits:
        pairs = hit["correspondences"]
        assert pairs.shape[1:] == (2, 2) and len(pairs) >= hit["rerank_score"]
        assert pairs.min() > 0 and pairs.max() < 1
    with pytest.raises(ValueError, match="stores no local features"):
        pipe(query, index=build_index(pipe, database[:2], store_local_features=False, progress=False),
             top_k=1, rerank=True)

    truth = {i for i in index.ids.tolist() if index.metadata([i])[0]["place"] == labels[1]}
    strip = plot_matches(query, plain[:3], tmp_path / "strip.png", ground_truth=truth)
    image = Image.open(strip).convert("RGB")
    panel = TILE + 2 * FRAME
    assert image.width == GAP + (panel + GAP) * 4
    frames = [image.getpixel((GAP + i * (panel + GAP) + 2, GAP + 2)) for i in range(4)]
    assert frames[0] == (40, 90, 200)  # the query
    for hit, colour in zip(plain[:3], frames[1:]):
        assert colour == ((0, 160, 60) if hit["index"] in truth else (210, 30, 30))
    pairs = Image.open(plot_matches(query, hits, tmp_path / "pairs.png"))
    assert pairs.height > 3 * panel  # one row per hit, with the correspondences drawn
    with pytest.raises(ValueError, match="no hits to plot"):
        plot_matches(query, [], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_cli_index_build_and_search(salad_dir, places, tmp_path, capsys):
    database, queries, labels = places
    images = tmp_path / "images"
    images.mkdir()
    for path in database:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "place", "note"])
        writer.writerows([[p.name, int(label), f"view of {label}"] for p, label in zip(database, labels)])
    out = tmp_path / "map.vprindex"
    build = ["index", "build", "--model", salad_dir, "--images", str(images), "--out", str(out),
             "--metadata", str(tmp_path / "rows.csv"), "--batch-size", "3", "--quiet"]
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(build) == 0
    printed = capsys.readouterr().out
    assert "indexed 8 of 9 files" in printed and "skipped" in printed and "broken.jpg" in printed
    assert main(build) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err

    query_files = [str(q) for q in queries[:2]]
    assert main(["search", "--index", str(out), *query_files, "--top-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    pipe = pipeline("place-recognition", model=salad_dir)
    expected = pipe(query_files, index=PlaceIndex.load(out), top_k=3)
    assert [r["query"] for r in results] == query_files
    assert [r["hits"] for r in results] == json.loads(json.dumps(expected))
    assert results[0]["hits"][0]["metadata"]["note"] == f"view of {results[0]['hits'][0]['metadata']['place']}"

    assert main(["search", "--index", str(out), query_files[0], "--plot", str(tmp_path / "hits.png")]) == 0
    table, said = capsys.readouterr()
    assert f"plot of {query_files[0]}: {tmp_path / 'hits.png'}\n" in said
    assert "rank" in table and "score" in table and "place=" in table
    assert Image.open(tmp_path / "hits.png").format == "PNG"
    assert main(["search", "--index", str(out), *query_files, "--plot", str(tmp_path / "many.png")]) == 0
    assert (tmp_path / "many_0.png").is_file() and (tmp_path / "many_1.png").is_file()
    replot = ["search", "--index", str(out), query_files[0], "--plot"]
    assert main([*replot, str(tmp_path / "hits.png")]) == 2
    assert "hits.png exists; pass --overwrite" in capsys.readouterr().err
    assert main([*replot, str(tmp_path / "hits.png"), "--overwrite"]) == 0  # a plot vprhub wrote
    capsys.readouterr()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "holiday.png")
    assert main([*replot, str(tmp_path / "holiday.png"), "--overwrite"]) == 2
    assert "holiday.png: it is not a vprhub match plot" in capsys.readouterr().err
    assert Image.open(tmp_path / "holiday.png").getpixel((0, 0)) == (255, 0, 0)
    assert main([*replot, str(images), "--overwrite"]) == 2
    assert "images is a folder; give the file to write" in capsys.readouterr().err

    other = save_model(tiny("salad", seed=5), tmp_path / "other")
    assert main(["search", "--index", str(out), query_files[0], "--model", other]) == 2
    assert "different weights" in capsys.readouterr().err
    assert main(["search", "--index", str(out), str(tmp_path / "nope.jpg")]) == 2
    assert "image file not found" in capsys.readouterr().err
