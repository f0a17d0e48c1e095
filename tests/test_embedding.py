"""The embedding engine: preprocessing split, batching rule, precision, store (resume, processes, disk full), CLI."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation_models import StandInModel

import vprhub
from vprhub.cli import main
from vprhub.descriptor_store import DescriptorStore
from vprhub.embedding import DatasetImages, Embedder
from vprhub.evaluation.recall import compute_recalls
from vprhub.modeling.image_processing import vpr_image_processor
from vprhub.pipelines import PlaceIndex, PlaceRecognitionPipeline
from vprhub.training.evaluation import load_eval_set

SIZE = 28


def write_images(folder, count, size=(40, 52)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def processor_batches(model, paths, batches):
    """Descriptors from the transformers processor + model, batch by batch (no engine code)."""
    processor = vpr_image_processor(SIZE, SIZE)
    out = []
    with torch.no_grad():
        for batch in batches:
            images = [Image.open(paths[i]).convert("RGB") for i in batch]
            out.append(model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).descriptors)
    return torch.cat(out).numpy()


def test_device_side_normalisation_matches_the_image_processor(tmp_path):
    paths = write_images(tmp_path, 3)
    processor = vpr_image_processor(SIZE, SIZE)
    engine = Embedder(StandInModel(), processor, num_workers=0)
    pixels = torch.from_numpy(np.stack([engine.preprocessing.decode(p) for p in paths]))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, SIZE, SIZE, 3)
    ours = engine.preprocessing.to_model(pixels, torch.device("cpu"), torch.float32)
    theirs = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_tensor_bilinear_rule_is_the_official_normalise_then_resize(tmp_path):
    """SelaVPR's and CricaVPR's converted processors: the engine reproduces normalising at full size,
    then resizing the float tensor without antialiasing (the processor's own call, by its rule)."""
    paths = write_images(tmp_path, 2, size=(97, 131))
    processor = vpr_image_processor(SIZE, SIZE, resize_rule="tensor_bilinear")
    engine = Embedder(StandInModel(), processor, num_workers=0)
    pixels = torch.from_numpy(np.stack([engine.preprocessing.decode(p) for p in paths]))
    ours = engine.preprocessing.to_model(pixels, torch.device("cpu"), torch.float32)
    official = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)
    antialiased = vpr_image_processor(SIZE, SIZE)(images=[Image.open(p) for p in paths], return_tensors="pt")
    assert (ours - antialiased["pixel_values"]).abs().max() > 0.1  # the rule matters at this downscale


class NicenessProbe(Sequence):
    """Engine inputs that record the niceness of the process that reads them."""

    def __init__(self, paths, record):
        self.paths, self.record = paths, record

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        (self.record / f"{i}.txt").write_text(str(os.nice(0)))
        return Image.open(self.paths[i])


def test_cpu_decoding_workers_yield_to_the_model(tmp_path):
    """On CPU the model keeps its threads and the decoding workers run at the lowest priority."""
    paths = write_images(tmp_path / "images", 4)
    (tmp_path / "record").mkdir()
    engine = Embedder(vprhub.build_model("salad", image_size=[56, 56]), num_workers=2)
    expected = engine.embed(paths).descriptors
    threads = torch.get_num_threads()
    (shard,) = engine.stream(NicenessProbe(paths, tmp_path / "record"), progress=False)
    np.testing.assert_array_equal(shard.descriptors, expected)
    assert torch.get_num_threads() == threads
    recorded = {int(p.read_text()) for p in (tmp_path / "record").iterdir()}
    assert recorded == {min(19, os.nice(0) + 19)}


def test_batches_are_consecutive_readable_images_in_order(tmp_path):
    """CricaVPR batch semantics: fixed batch size over the readable images, input order kept."""
    paths = write_images(tmp_path, 7)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    inputs = [paths[0], broken, *paths[1:]]
    model = StandInModel(batch_coupled=True)
    engine = Embedder(model, vpr_image_processor(SIZE, SIZE), batch_size=3, num_workers=2)
    (shard,) = engine.stream(inputs, shard_size=9, progress=False)
    assert shard.rows.tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert [s["input"] for s in shard.skipped] == [str(broken)]
    expected = processor_batches(model, paths, [[0, 1, 2], [3, 4, 5], [6]])
    np.testing.assert_allclose(shard.descriptors, expected, atol=1e-6)
    report = engine.report
    assert (report.images, report.embedded, len(report.skipped)) == (8, 7, 1)
    assert "embedded 7 of 8 images" in report.summary() and "broken.png" in report.summary()


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_batch_size_must_be_positive(batch_size, capsys, tmp_path):
    """Issue 16 item 12: a batch size <= 0 is refused, never recorded."""
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Embedder(StandInModel(), vpr_image_processor(SIZE, SIZE), batch_size=batch_size)
    pipe = PlaceRecognitionPipeline(model=vprhub.build_model("salad", image_size=[56, 56]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(np.zeros((8, 8, 3), np.uint8), batch_size=batch_size)
    with pytest.raises(SystemExit) as stop:
        main(["index", "build", "--model", "m", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
              "--batch-size", str(batch_size)])
    assert stop.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("precision", ["bfloat16", "autocast-bfloat16"])
def test_bfloat16_descriptors_agree_with_float32(precision):
    torch.manual_seed(0)
    reference = vprhub.build_model("salad", image_size=[56, 56])
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 56, 56, 3), dtype=np.uint8))
    expected, _ = Embedder(reference, num_workers=0).forward(pixels)
    half = vprhub.build_model("salad", image_size=[56, 56])
    half.load_state_dict(reference.state_dict())
    engine = Embedder(half, num_workers=0, precision=precision)
    descriptors, _ = engine.forward(pixels)
    assert descriptors.dtype == np.float32
    assert (descriptors * expected).sum(1).min() >= 0.9999
    assert engine.settings["precision"] == precision
    assert (next(half.parameters()).dtype == torch.bfloat16) == (precision == "bfloat16")


@pytest.mark.parametrize("precision", ["bfloat16", "autocast-bfloat16"])
def test_bfloat16_keeps_recall_at_1_on_the_synthetic_benchmark(tmp_path, precision):
    test_set = load_eval_set("synthetic", tmp_path, synthetic_places=40, image_size=(56, 56))
    torch.manual_seed(0)
    reference = vprhub.build_model("salad", image_size=[56, 56])
    half = vprhub.build_model("salad", image_size=[56, 56])
    half.load_state_dict(reference.state_dict())
    engines = {"float32": Embedder(reference, num_workers=0), precision: Embedder(half, precision=precision, num_workers=0)}
    recalls = {}
    for name, engine in engines.items():
        database = engine.embed(test_set.database_paths).descriptors
        queries = engine.embed(test_set.query_paths).descriptors
        recalls[name] = compute_recalls(database, queries, test_set.positives, k_values=(1, 5)).recalls
    assert 0.1 < recalls["float32"][1] < 1  # well above chance (1/40), yet not saturated
    assert recalls[precision] == recalls["float32"]


def test_compile_gives_the_same_descriptors(tmp_path):
    torch.manual_seed(0)
    model = StandInModel()
    paths = write_images(tmp_path, 4)
    plain = Embedder(model, vpr_image_processor(SIZE, SIZE), batch_size=2, num_workers=0).embed(paths)
    compiled = Embedder(model, vpr_image_processor(SIZE, SIZE), batch_size=2, num_workers=0, compile="eager")
    np.testing.assert_allclose(compiled.embed(paths).descriptors, plain.descriptors, atol=1e-6)
    assert compiled.settings["compile"] == "eager"


def test_identity_probe_does_not_run_the_compiled_model():
    """The 2-image probe would make torch.compile compile a second graph; it runs the plain model."""
    torch.manual_seed(0)
    model = StandInModel()
    plain = Embedder(model, vpr_image_processor(SIZE, SIZE), num_workers=0).identity()
    compiled = Embedder(model, vpr_image_processor(SIZE, SIZE), num_workers=0, compile="eager")

    def refuse(**_):
        raise AssertionError("the identity probe ran the compiled model")

    compiled._run_model = refuse
    identity = compiled.identity()
    assert identity["probe"] == plain["probe"] and identity["weights"] == plain["weights"]


def test_killed_run_resumes_to_the_same_store(tmp_path):
    """A run that dies after two shards keeps them; the rerun embeds only the rest, identically."""
    paths = write_images(tmp_path / "img", 10)
    processor = vpr_image_processor(SIZE, SIZE)
    model = StandInModel(batch_coupled=True)
    whole = Embedder(model, processor, batch_size=2, num_workers=0)
    reference = whole.embed_to_store(paths, tmp_path / "reference", shard_size=4, progress=False)

    calls = []

    def die_on_fifth_batch(module, args):
        calls.append(1)
        if len(calls) == 5 + 1:  # the identity probe runs first
            raise KeyboardInterrupt  # as a kill between shards 2 and 3 would
    handle = model.register_forward_pre_hook(die_on_fifth_batch)
    engine = Embedder(model, processor, batch_size=2, num_workers=0)
    with pytest.raises(KeyboardInterrupt):
        engine.embed_to_store(paths, tmp_path / "store", shard_size=4, progress=False)
    handle.remove()
    store = DescriptorStore.open(tmp_path / "store")
    assert store.finished() == {0, 1} and not store.complete
    (tmp_path / "store" / ".shard-000002.abc.tmp").mkdir()  # what a kill -9 during a write leaves

    resumed = Embedder(model, processor, batch_size=2, num_workers=0)
    store = resumed.embed_to_store(paths, tmp_path / "store", shard_size=4, progress=False)
    assert resumed.report.images == 2  # only the last shard was embedded again
    assert sorted(p.name for p in store.path.iterdir()) == ["shard-000000", "shard-000001", "shard-000002", "store.json"]
    for ours, theirs in zip(store.shards(), reference.shards()):
        np.testing.assert_array_equal(ours.rows, theirs.rows)
        np.testing.assert_array_equal(ours.descriptors, theirs.descriptors)
    with pytest.raises(FileExistsError, match="holds descriptors of other inputs"):
        Embedder(model, processor, batch_size=4, num_workers=0).embed_to_store(paths, tmp_path / "store", progress=False)


def test_processes_share_a_store_and_merge_to_the_single_process_result(tmp_path):
    paths = write_images(tmp_path / "img", 9)
    processor = vpr_image_processor(SIZE, SIZE)
    model = StandInModel(batch_coupled=True)
    single = Embedder(model, processor, batch_size=2, num_workers=0)
    one = single.embed_to_store(paths, tmp_path / "one", shard_size=2, dtype="float16", progress=False)
    for rank in (1, 0):  # as two `accelerate launch` processes would, in any order
        engine = Embedder(model, processor, batch_size=2, num_workers=0)
        shared = engine.embed_to_store(
            paths, tmp_path / "two", shard_size=2, dtype="float16", process_index=rank, num_processes=2, progress=False
        )
        assert shared.finished() >= set(range(rank, 5, 2))
    assert shared.complete and shared.manifest == one.manifest
    merged = np.concatenate([s.descriptors for s in shared.shards()])
    np.testing.assert_array_equal(merged, np.concatenate([s.descriptors for s in one.shards()]))
    assert merged.dtype == np.float16
    expected = processor_batches(model, paths, [[0, 1], [2, 3], [4, 5], [6, 7], [8]])
    # the store holds float16: its rounding (half an ulp, <= 2.4e-4 for |x| < 0.5) bounds this check;
    # the merge itself is bit-exact (assert_array_equal above)
    np.testing.assert_allclose(merged.astype(np.float32), expected, atol=1e-3)


def test_full_disk_leaves_no_half_written_shard(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "img", 4)
    engine = Embedder(StandInModel(local=True), vpr_image_processor(SIZE, SIZE), batch_size=2, num_workers=0)
    real_save = np.save

    def save(file, array, *args, **kwargs):
        if "local_features" in str(file) and len(array) and DescriptorStore.open(tmp_path / "s").finished():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(OSError, match="No space left"):
        engine.embed_to_store(paths, tmp_path / "s", local_features=True, shard_size=2, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["shard-000000", "store.json"]
    store = engine.embed_to_store(paths, tmp_path / "s", local_features=True, shard_size=2, progress=False)
    assert store.complete and sum(len(s.rows) for s in store.shards()) == 4


def test_cli_index_build_resumes_and_accepts_dotted_paths(tmp_path, monkeypatch, capsys):
    """Issue 16 item 8 (``--images ../x/db``) and a killed build that resumes from its store."""
    db = tmp_path / ".data" / "db"
    write_images(db, 5)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    vprhub.build_model("salad", image_size=[56, 56]).save_pretrained(model_dir)
    vpr_image_processor(56, 56).save_pretrained(model_dir)
    work = tmp_path / ".data" / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    build = ["index", "build", "--model", str(model_dir), "--images", "../db", "--out", "map.vprindex",
             "--batch-size", "2", "--num-workers", "0", "--quiet"]
    assert main(build) == 0
    assert "indexed 5 of 5 files" in capsys.readouterr().out
    first = PlaceIndex.load(work / "map.vprindex")
    assert not (work / ".map.vprindex.embeddings").exists()  # the temporary store is removed
    assert first.build_report["settings"]["precision"] == "float32"

    # a kept store (what a killed run leaves) is taken up by the next run with the same inputs
    assert main([*build, "--overwrite", "--store", "kept"]) == 0
    capsys.readouterr()
    assert main([*build, "--overwrite", "--store", "kept", "--out", "again.vprindex"]) == 0
    assert "5 from the store" in capsys.readouterr().out
    again = PlaceIndex.load(work / "again.vprindex")
    queries = np.eye(again.dim, dtype=np.float32)[:3]
    assert [a.tolist() for a in again.search(queries, 5)] == [b.tolist() for b in first.search(queries, 5)]

    # a default store left by a killed run with other settings is vprhub's own: replaced, not an error
    other = [*build[:-5], "--batch-size", "3", "--num-workers", "0", "--quiet"]
    assert main([*other, "--out", "x.vprindex", "--store", ".x.vprindex.embeddings"]) == 0
    assert main([*build, "--out", "x.vprindex", "--overwrite"]) == 0
    assert not (work / ".x.vprindex.embeddings").exists()


def test_datasets_images_are_embedded_like_files(tmp_path):
    import datasets

    paths = write_images(tmp_path, 3)
    dataset = datasets.Dataset.from_dict({"image": [str(p) for p in paths]}).cast_column("image", datasets.Image())
    engine = Embedder(StandInModel(), vpr_image_processor(SIZE, SIZE), batch_size=2, num_workers=0)
    (shard,) = engine.stream(DatasetImages(dataset), progress=False)
    np.testing.assert_array_equal(shard.descriptors, engine.embed(paths).descriptors)
