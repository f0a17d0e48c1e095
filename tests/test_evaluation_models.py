"""Descriptor extraction, evaluation end to end on every layout, re-ranking, `vprhub eval`, the metric."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_evaluation import (
    brute_force_recalls,
    ranking_recalls,
    write_geo_dataset,
    write_image,
    write_msls,
    write_npy_lists,
)
from transformers.utils import ModelOutput

from vprhub.evaluation import (
    RECALL_METRIC_PATH,
    VPRTestSet,
    default_local_scorer,
    evaluate_model,
    extract_descriptors,
    load_test_set,
    rerank_predictions,
)
from vprhub.evaluation.cli import format_table, register
from vprhub.modeling import local_matching
from vprhub.modeling.image_processing import vpr_image_processor

SIZE = 28


@dataclass
class StandInOutput(ModelOutput):
    descriptors: torch.FloatTensor | None = None
    local_features: torch.FloatTensor | None = None


class StandInModel(torch.nn.Module):
    """Meets the model contract: 4x4 pooled colours -> linear -> L2 norm; local maps = pooled cells.

    ``batch_coupled`` adds the batch mean before normalising, so descriptors depend on the
    batch (as CricaVPR's do).
    """

    def __init__(self, local: bool = False, batch_coupled: bool = False) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(48, 16)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.random.default_rng(0).standard_normal((16, 48))))
            self.proj.bias.zero_()
        self.local, self.batch_coupled = local, batch_coupled

    def forward(self, pixel_values: torch.Tensor) -> StandInOutput:
        pooled = F.adaptive_avg_pool2d(pixel_values, 4)
        features = self.proj(pooled.flatten(1))
        if self.batch_coupled:
            features = features + features.mean(0, keepdim=True)
        local = F.normalize(pooled.permute(0, 2, 3, 1), dim=-1) if self.local else None
        return StandInOutput(descriptors=F.normalize(features, dim=-1), local_features=local)


def reference_outputs(model, processor, paths):
    """All images in one batch (the models here are batch-independent), with no vprhub evaluation code."""
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        return model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])


def reference_descriptors(model, processor, paths) -> np.ndarray:
    return reference_outputs(model, processor, paths).descriptors.numpy()


LAYOUTS = {
    "geo": lambda root: (write_geo_dataset(root / "st_lucia" / "images" / "test"), "st_lucia"),
    "msls": lambda root: (write_msls(root / "mapillary_sls"), "msls_val"),
    "nordland": lambda root: (write_npy_lists(root / "Nordland", "Nordland", "gt"), "nordland"),
    "msls_npy": lambda root: (write_npy_lists(root / "mapillary", "msls_val", "idx"), "msls_val"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_evaluate_every_layout_against_brute_force(tmp_path, layout):
    expected, name = LAYOUTS[layout](tmp_path)
    test_set = load_test_set(name, tmp_path)
    model, processor = StandInModel(), vpr_image_processor(SIZE, SIZE)
    result = evaluate_model(model, processor, test_set, batch_size=4, progress=False)
    reference = brute_force_recalls(
        reference_descriptors(model, processor, expected["database"]),
        reference_descriptors(model, processor, expected["queries"]),
        expected["positives"],
        (1, 5, 10),
    )
    assert {k: result[f"recall@{k}"] for k in (1, 5, 10)} == reference
    assert 0 < reference[10]
    assert result["num_queries"] == len(expected["queries"])
    assert result["num_database"] == len(expected["database"])
    assert result["queries_without_positives"] == sum(not p for p in expected["positives"])
    assert result["excluded_queries"] == expected.get("excluded", 0)
    assert result["dataset"] == name and result["reranked"] is False and result["seconds"] >= 0


def test_extraction_batches_in_file_order_and_cache(tmp_path):
    paths = [write_image(tmp_path / "img" / f"{i}.jpg", seed=i) for i in range(7)]
    processor = vpr_image_processor(SIZE, SIZE)
    model = StandInModel(batch_coupled=True)
    cache = tmp_path / "cache"
    descriptors = extract_descriptors(model, processor, paths, batch_size=3, cache_dir=cache, progress=False)
    pixels = torch.cat([processor(images=Image.open(p), return_tensors="pt")["pixel_values"] for p in paths])
    with torch.no_grad():
        expected = torch.cat([model(pixel_values=pixels[i : i + 3]).descriptors for i in (0, 3, 6)]).numpy()
    np.testing.assert_allclose(descriptors, expected, atol=1e-6)
    assert descriptors.dtype == np.float32 and len(cache_entries(cache)) == 1
    autocast = extract_descriptors(model, processor, paths, batch_size=3, dtype=torch.bfloat16, progress=False)
    assert autocast.dtype == np.float32 and np.abs(autocast - expected).max() < 0.05
    assert not [p for p in cache.rglob(".*")]  # no temporary file left behind

    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    again = extract_descriptors(model, processor, paths, batch_size=3, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again, descriptors)
    assert len(calls) == 1  # only the identity's probe batch: the images are served from the cache
    extract_descriptors(model, processor, paths, batch_size=2, cache_dir=cache, progress=False)
    assert calls and len(cache_entries(cache)) == 2  # another batching, another entry
    with torch.no_grad():
        model.proj.bias.add_(0.1)
    changed = extract_descriptors(model, processor, paths, batch_size=3, cache_dir=cache, progress=False)
    assert not np.allclose(changed, descriptors) and len(cache_entries(cache)) == 3


def test_local_features_in_memory_and_cached(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    processor, model = vpr_image_processor(SIZE, SIZE), StandInModel(local=True)
    descriptors, local = extract_descriptors(model, processor, paths, batch_size=2, return_local=True, progress=False)
    cached, cached_local = extract_descriptors(
        model, processor, paths, batch_size=2, return_local=True, cache_dir=tmp_path / "c", progress=False
    )
    assert local.dtype == np.float16 and local.shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(cached_local, local)
    np.testing.assert_array_equal(cached, descriptors)
    assert isinstance(cached_local.parts[0], np.memmap)  # read out of core from the cache


def cache_entries(cache):
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_cache_is_keyed_by_file_content_not_path(tmp_path):
    """Issue 16 item 13: an image replaced at the same path must not return stale descriptors."""
    paths = [write_image(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    processor, model = vpr_image_processor(SIZE, SIZE), StandInModel()
    first = extract_descriptors(model, processor, paths, batch_size=2, cache_dir=tmp_path / "c", progress=False)
    write_image(paths[1], seed=9)  # another picture, same name
    again = extract_descriptors(model, processor, paths, batch_size=2, cache_dir=tmp_path / "c", progress=False)
    fresh = extract_descriptors(model, processor, paths, batch_size=2, progress=False)
    np.testing.assert_array_equal(again, fresh)
    assert not np.allclose(again[1], first[1]) and np.array_equal(again[[0, 2]], first[[0, 2]])


def test_unreadable_images_and_bombs_are_skipped_and_counted(tmp_path):
    """Issue 16 item 10: a decompression bomb (or a broken file) is skipped and counted, not a traceback."""
    good = write_image(tmp_path / "good.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 megapixels in a few kilobytes
    processor = vpr_image_processor(SIZE, SIZE)
    skipped = []
    with pytest.warns(UserWarning, match="decompression bomb"):
        descriptors = extract_descriptors(StandInModel(), processor, [good, bomb, broken], progress=False, skipped=skipped)
    assert [s["input"] for s in skipped] == [str(bomb), str(broken)]
    assert "decompression bomb" in skipped[0]["error"] and "cannot read image" in skipped[1]["error"]
    alone = extract_descriptors(StandInModel(), processor, [good], progress=False)
    np.testing.assert_array_equal(descriptors[0], alone[0])
    assert not descriptors[1:].any()  # skipped images are zero vectors
    with pytest.raises(ValueError, match="re-ranking needs all of them"):
        extract_descriptors(StandInModel(local=True), processor, [good, broken], return_local=True, progress=False)
    with pytest.raises(ValueError, match="no `local_features`"):
        extract_descriptors(StandInModel(), processor, [good], return_local=True, progress=False)
    with pytest.raises(ValueError, match="no images"):
        extract_descriptors(StandInModel(), processor, [], progress=False)


def test_unreadable_images_are_neither_scored_nor_retrieved(tmp_path):
    """A skipped query leaves the recalls; a skipped database image is never a hit (no zero-vector ties)."""
    first, second = write_image(tmp_path / "db0.jpg", seed=1), write_image(tmp_path / "db1.jpg", seed=2)
    broken = tmp_path / "db2.jpg"
    broken.write_bytes(b"not a jpeg")
    bomb = tmp_path / "q0.png"
    Image.new("1", (20000, 10000)).save(bomb)
    # the bomb query's positive is row 0; the copy of db1 has only the unreadable row 2 as positive
    test_set = VPRTestSet("t", [first, second, broken], [bomb, first, second], [[0], [0], [2]])
    with pytest.warns(UserWarning, match="skipping"):
        result = evaluate_model(StandInModel(), vpr_image_processor(SIZE, SIZE), test_set, progress=False)
    assert (result["num_queries"], result["evaluated_queries"], result["num_database"]) == (3, 2, 3)
    assert result["skipped_queries"] == [str(bomb)] and result["skipped_database"] == [str(broken)]
    assert [result[f"recall@{k}"] for k in (1, 5, 10)] == [0.5, 0.5, 0.5]
    table = format_table([result])
    assert table.splitlines()[0].split()[:5] == ["dataset", "queries", "evaluated", "database", "skipped"]
    assert table.splitlines()[1].split()[:5] == ["t", "3", "2", "3", "2"]


def test_training_recall_skips_unreadable_images_too(tmp_path):
    from accelerate import Accelerator

    from vprhub.training.evaluation import evaluate_recall

    first, second = write_image(tmp_path / "db0.jpg", seed=1), write_image(tmp_path / "db1.jpg", seed=2)
    broken = tmp_path / "db2.jpg"
    broken.write_bytes(b"not a jpeg")
    unreadable_query = tmp_path / "q0.jpg"
    unreadable_query.write_bytes(b"not a jpeg either")
    test_set = VPRTestSet("t", [first, second, broken], [unreadable_query, first, second], [[0], [0], [2]])
    with pytest.warns(UserWarning, match="skipping"):
        result = evaluate_recall(Accelerator(cpu=True), StandInModel(), test_set, vpr_image_processor(SIZE, SIZE))
    assert [result[f"recall@{k}"] for k in (1, 5, 10)] == [0.5, 0.5, 0.5]
    assert (result["evaluated_queries"], result["skipped_database"]) == (2, 1)


def negative_distance(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return -((candidates - query) ** 2).flatten(1).sum(1)


def test_rerank_predictions_orders_by_score_ties_kept():
    query_local = np.zeros((1, 2, 2, 1), np.float16)
    database_local = np.array([3.0, 1.0, 2.0, 1.0, 5.0], np.float16)[:, None, None, None] * np.ones((1, 2, 2, 1))
    predictions = np.array([[0, 3, 1, 2, -1]])
    reranked = rerank_predictions(predictions, query_local, database_local, negative_distance, progress=False)
    assert reranked.tolist() == [[3, 1, 2, 0, -1]]  # 3 and 1 tie: global order kept


def test_evaluate_with_rerank_against_manual_rerank(tmp_path):
    expected = write_geo_dataset(tmp_path / "ds")
    test_set = load_test_set(str(tmp_path / "ds"))
    model, processor = StandInModel(local=True), vpr_image_processor(SIZE, SIZE)
    result = evaluate_model(
        model,
        processor,
        test_set,
        batch_size=5,
        rerank=True,
        rerank_num=4,
        local_scorer=negative_distance,
        progress=False,
    )
    database = reference_descriptors(model, processor, expected["database"])
    queries = reference_descriptors(model, processor, expected["queries"])
    assert {k: result[f"global_recall@{k}"] for k in (1, 5, 10)} == brute_force_recalls(
        database, queries, expected["positives"], (1, 5, 10)
    )

    def local(paths):
        return reference_outputs(model, processor, paths).local_features.half().float().numpy()

    db_maps, q_maps = local(expected["database"]), local(expected["queries"])
    top = np.argsort(((queries[:, None].astype(np.float64) - database[None]) ** 2).sum(-1), axis=1, kind="stable")
    manual = [
        [c for _, c in sorted(((((db_maps[c] - q_maps[q]) ** 2).sum(), c) for c in top[q, :4]), key=lambda t: t[0])]
        for q in range(len(top))
    ]
    assert {k: result[f"recall@{k}"] for k in (1, 5, 10)} == ranking_recalls(manual, expected["positives"], (1, 5, 10))
    assert result["reranked"] is True


def mutual_nn_count(query: np.ndarray, candidate: np.ndarray) -> float:
    """SelaVPR's score by hand: mutual nearest neighbours of flattened maps; a single match scores 0."""
    similarity = candidate.reshape(-1, query.shape[-1]) @ query.reshape(-1, query.shape[-1]).T
    best_candidate, best_query = similarity.argmax(0), similarity.argmax(1)
    count = int((best_query[best_candidate] == np.arange(similarity.shape[1])).sum())
    return 0.0 if count == 1 else float(count)


def test_default_scorer_reranks_like_selavpr():
    rng = np.random.default_rng(5)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    query = unit(rng.standard_normal((6, 6, 8))).astype(np.float32)
    database = unit(query + rng.uniform(0.2, 2.0, (12, 1, 1, 1)) * rng.standard_normal((12, 6, 6, 8))).astype(
        np.float32
    )
    predictions = np.array([rng.permutation(12)[:8]])
    reranked = rerank_predictions(predictions, query[None], database, default_local_scorer(), progress=False)
    scores = np.array([mutual_nn_count(query, database[c]) for c in predictions[0]])
    assert len(set(scores)) > 3
    assert reranked[0].tolist() == predictions[0][np.argsort(-scores, kind="stable")].tolist()  # ties: global order
    order, _ = local_matching.rerank(torch.from_numpy(query), torch.from_numpy(database[predictions[0]]))
    assert predictions[0][order.numpy()].tolist() == reranked[0].tolist()


def test_default_local_scorer_reranks_end_to_end(tmp_path):
    write_geo_dataset(tmp_path / "ds")
    test_set = load_test_set(str(tmp_path / "ds"))
    result = evaluate_model(
        StandInModel(local=True),
        vpr_image_processor(SIZE, SIZE),
        test_set,
        rerank=True,
        rerank_num=5,
        progress=False,
    )
    assert 0 <= result["recall@1"] <= result["recall@5"] <= 1


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vprhub")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_eval_tiny_salad_end_to_end(tmp_path, capsys):
    import vprhub

    model = vprhub.build_model("salad", backbone="tiny", image_size=[56, 56]).eval()
    model.save_pretrained(tmp_path / "salad")
    vpr_image_processor(56, 56).save_pretrained(tmp_path / "salad")
    geo = write_geo_dataset(tmp_path / "data" / "pitts30k" / "images" / "test")
    npy = write_npy_lists(tmp_path / "lists", "SPED", "single")
    out = tmp_path / "results.json"
    argv = [
        "eval",
        "--model",
        str(tmp_path / "salad"),
        "--dataset",
        "pitts30k_test",
        str(tmp_path / "lists" / "SPED_dbImages.npy"),
        "--root",
        str(tmp_path / "data"),
        "--image-size",
        "70",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert run_cli(argv) == 0
    table = capsys.readouterr().out
    assert "pitts30k_test" in table and "R@10" in table
    report = json.loads(out.read_text())
    assert report["format"] == "vprhub-eval-results" and report["format_version"] == 1
    assert report["image_size"] == [70, 70] and report["model"] == str(tmp_path / "salad")
    processor = vpr_image_processor(70, 70)
    for key, expected in (("pitts30k_test", geo), (str(tmp_path / "lists" / "SPED_dbImages.npy"), npy)):
        entry = report["datasets"][key]
        reference = brute_force_recalls(
            reference_descriptors(model, processor, expected["database"]),
            reference_descriptors(model, processor, expected["queries"]),
            expected["positives"],
            (1, 5, 10),
        )
        assert {k: entry[f"recall@{k}"] for k in (1, 5, 10)} == reference
        assert entry["num_queries"] == len(expected["queries"]) and entry["num_database"] == len(expected["database"])
        assert entry["queries_without_positives"] == sum(not p for p in expected["positives"])
        assert f"{100 * entry['recall@1']:.2f}" in table
    with pytest.raises(FileExistsError, match="results.json exists; pass --overwrite"):
        run_cli(argv)
    quiet = [*argv[:-1], "--quiet", "--overwrite"]  # --quiet is --no-progress; a results file vprhub wrote
    assert run_cli(quiet) == 0  # second run served from the descriptor cache
    assert (
        json.loads(out.read_text())["datasets"]["pitts30k_test"]["recall@5"]
        == report["datasets"]["pitts30k_test"]["recall@5"]
    )


def test_cli_bad_input(tmp_path):
    write_geo_dataset(tmp_path / "data" / "pitts30k" / "images" / "test")
    with pytest.raises(FileNotFoundError, match="nowhere not found: no such file or folder"):
        run_cli(
            ["eval", "--model", str(tmp_path / "nowhere"), "--dataset", "pitts30k", "--root", str(tmp_path / "data")]
        )
    with pytest.raises(FileNotFoundError, match="'tokyo247' not found"):
        run_cli(["eval", "--model", "x", "--dataset", "tokyo247", "--root", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="--image-size"):
        run_cli(["eval", "--model", "x", "--dataset", "pitts30k", "--image-size", "1", "2", "3"])


def test_cli_eval_json_never_replaces_other_files(tmp_path):
    """--json refuses a folder and files it did not write, before loading anything (the model is missing)."""
    photo = write_image(tmp_path / "photo.jpg")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    lookalike = tmp_path / "lookalike.json"  # the keys of a results file, but not vprhub's mark
    lookalike.write_text('{"model": "my notes", "image_size": 1, "rerank": 0, "datasets": {}, "mine": "data"}')
    before = photo.read_bytes()
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--dataset", str(tmp_path), "--overwrite", "--json"]
    with pytest.raises(FileExistsError, match="is a folder; give the file to write"):
        run_cli([*argv, str(tmp_path)])
    for path in (photo, notes, lookalike):
        with pytest.raises(FileExistsError, match=f"refusing to replace {path}: it is not a vprhub eval results file"):
            run_cli([*argv, str(path)])
    with pytest.raises(FileExistsError, match="photo.jpg exists; pass --overwrite"):
        run_cli([*argv[:-2], "--json", str(photo)])
    assert photo.read_bytes() == before and notes.read_text() == '{"mine": 1}'


def test_evaluate_metric_module():
    import evaluate

    metric = evaluate.load(RECALL_METRIC_PATH, keep_in_memory=True)
    rng = np.random.default_rng(1)
    database, queries = rng.standard_normal((40, 8)), rng.standard_normal((15, 8))
    positives = [rng.choice(40, size=rng.integers(0, 4), replace=False).tolist() for _ in range(15)]
    ranking = np.argsort(((queries[:, None] - database[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :10]
    result = metric.compute(predictions=ranking.tolist(), references=positives)
    assert result == {
        f"recall@{k}": v for k, v in brute_force_recalls(database, queries, positives, (1, 5, 10)).items()
    }
    ragged = metric.compute(predictions=[[3, 1], [0, 2, 1]], references=[[1], []], k_values=[1, 2])
    assert ragged == {"recall@1": 0.0, "recall@2": 0.5}


def test_cli_eval_rerank_tiny_selavpr(tmp_path, capsys):
    import vprhub

    torch.manual_seed(0)
    model = vprhub.build_model("selavpr", backbone="tiny", image_size=[56, 56]).eval()
    model.save_pretrained(tmp_path / "selavpr")
    vpr_image_processor(56, 56).save_pretrained(tmp_path / "selavpr")
    expected = write_geo_dataset(tmp_path / "ds")
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tmp_path / "selavpr"), "--dataset", str(tmp_path / "ds"), "--rerank"]
    assert run_cli(argv + ["--rerank-num", "5", "--batch-size", "4", "--json", str(out), "--no-progress"]) == 0
    entry = json.loads(out.read_text())["datasets"][str(tmp_path / "ds")]
    assert entry["reranked"] is True and json.loads(out.read_text())["rerank"] is True

    processor = vpr_image_processor(56, 56)
    database, queries = (reference_outputs(model, processor, expected[side]) for side in ("database", "queries"))
    global_ranking = np.argsort(
        ((queries.descriptors.double()[:, None] - database.descriptors.double()[None]) ** 2).sum(-1).numpy(),
        axis=1,
        kind="stable",
    )
    positives = expected["positives"]
    assert {k: entry[f"global_recall@{k}"] for k in (1, 5, 10)} == ranking_recalls(
        global_ranking, positives, (1, 5, 10)
    )
    db_maps, q_maps = database.local_features.half().float(), queries.local_features.half().float()
    reranked = []
    for q, candidates in enumerate(global_ranking[:, :5]):
        scores = local_matching.mutual_nn_scores(q_maps[q], db_maps[candidates]).numpy()
        reranked.append(candidates[np.argsort(-scores, kind="stable")])
    assert {k: entry[f"recall@{k}"] for k in (1, 5, 10)} == ranking_recalls(reranked, positives, (1, 5, 10))
    assert "R@1" in capsys.readouterr().out
