"""MegaLoc: conversion refusals and the projection head (parity is in test_megaloc_parity.py)."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, pipeline

import vprhub
from vprhub.modeling import mark_trainable
from parity import load_manifest, regenerate_weights
from test_evaluation import brute_force_recalls
from vprhub import build_index, hub
from vprhub.cli import main as vprhub_main
from vprhub.data.synthetic import write_gmberton_benchmark
from vprhub.evaluation.geo_folder import read_geo_folder
from vprhub.modeling.backbone import tiny_dinov2_config


@pytest.fixture(scope="module")
def official_megaloc():
    return regenerate_weights(load_manifest("megaloc"))


def _convert(tmp_path, model: str, state_dict: dict, name: str = "model.safetensors") -> int:
    checkpoint = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state_dict, str(checkpoint))
    else:
        torch.save(state_dict, checkpoint)
    return vprhub_main(["convert", model, str(checkpoint), str(tmp_path / "out")])


def test_missing_and_unexpected_keys_are_listed(official_megaloc, tmp_path, capsys):
    broken = dict(official_megaloc)
    del broken["aggregator.agg.token_features.0.bias"]
    broken["aggregator.agg.extra.weight"] = torch.zeros(1)
    assert _convert(tmp_path, "megaloc", broken) == 2
    error = capsys.readouterr().err
    assert "missing keys [aggregator.token_features.0.bias] (1)" in error
    assert "unexpected keys [aggregator.extra.weight] (1)" in error
    assert not (tmp_path / "out").exists()


def test_keys_outside_the_model_are_refused(official_megaloc, tmp_path, capsys):
    assert _convert(tmp_path, "megaloc", official_megaloc | {"optimizer.step": torch.zeros(1)}) == 2
    assert "not a MegaLoc checkpoint: unexpected keys ['optimizer.step']" in capsys.readouterr().err


def test_salad_checkpoint_is_refused_and_megaloc_is_not_salad(official_megaloc, tmp_path, capsys):
    salad = regenerate_weights(load_manifest("salad"))
    assert _convert(tmp_path, "megaloc", salad, "dino_salad.ckpt") == 2
    error = capsys.readouterr().err
    assert "not a MegaLoc checkpoint: missing keys ['backbone.cls_token', 'aggregator.agg.score.3.weight'" in error
    assert _convert(tmp_path, "salad", official_megaloc) == 2
    assert "not a SALAD checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inconsistent_shapes_are_listed(official_megaloc, tmp_path, capsys):
    broken = dict(official_megaloc)
    broken["aggregator.agg.score.0.weight"] = torch.zeros(100, 384, 1, 1)
    assert _convert(tmp_path, "megaloc", broken) == 2
    error = capsys.readouterr().err
    assert "aggregator.score.0.weight (100, 384, 1, 1) (expected (256, 384, 1, 1))" in error


def test_corrupt_safetensors_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert vprhub_main(["convert", "megaloc", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "cannot be read as a safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_projection_defines_the_descriptor():
    """The descriptor is L2(W a + b) of the aggregation a; SALAD (no projection) returns a itself."""
    torch.manual_seed(0)
    model = vprhub.build_model("megaloc").eval()
    pixels = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        out = model(pixels)
        projected = torch.nn.functional.normalize(out.aggregation @ model.projection.weight.T + model.projection.bias, dim=-1)
    torch.testing.assert_close(out.descriptors, projected, rtol=0, atol=1e-6)
    assert out.descriptors.shape == (2, model.config.projection_dim) != out.aggregation.shape
    salad = vprhub.build_model("salad").eval()
    salad.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("projection.")})
    with torch.no_grad():
        salad_out = salad(pixels)
    assert salad_out.aggregation is None
    torch.testing.assert_close(salad_out.descriptors, out.aggregation, rtol=0, atol=0)


def test_every_block_is_trained():
    model = vprhub.build_model("megaloc", backbone_config=tiny_dinov2_config(num_hidden_layers=3))
    assert model.config.num_trainable_blocks == 3
    mark_trainable(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.embeddings.mask_token"]  # used only by masked-image pre-training
    assert vprhub.MegaLocConfig().num_trainable_blocks == 12  # ViT-B/14, as released


@pytest.fixture(scope="module")
def megaloc_dir(tmp_path_factory):
    """A tiny random MegaLoc saved with its image processor (56 x 56: a 4 x 4 patch grid)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("megaloc-tiny")
    vprhub.build_model("megaloc", image_size=[56, 56]).save_pretrained(folder)
    vprhub.vpr_image_processor(56, 56).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = write_gmberton_benchmark(tmp_path_factory.mktemp("bench") / "city", num_places=6, image_size=64)
    return read_geo_folder(root / "images" / "test")


def direct_descriptors(folder, paths) -> np.ndarray:
    """Image processor + model, one batch, without the pipeline or the embedding engine."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        return model(pixels).descriptors.numpy()


def test_pipeline_and_index_serve_megaloc(megaloc_dir, benchmark):
    pipe = pipeline("place-recognition", model=str(megaloc_dir))
    database = [str(p) for p in benchmark.database_paths]
    vectors = np.stack(pipe(database, batch_size=4))
    np.testing.assert_allclose(vectors, direct_descriptors(megaloc_dir, database), rtol=0, atol=1e-6)
    index = build_index(pipe, database, progress=False)
    hits = pipe(database[3], index=index, top_k=2)
    assert hits[0]["index"] == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="megaloc models produce no local features"):
        pipe(database[0], return_local_features=True)
    with pytest.raises(ValueError, match="megaloc models produce no local features: re-ranking needs a SelaVPR model"):
        pipe(database[0], index=index, rerank=True)


def test_eval_matches_brute_force_and_refuses_rerank(megaloc_dir, benchmark, tmp_path, capsys):
    root = benchmark.database_paths[0].parents[1]
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(megaloc_dir), "--dataset", str(root), "--batch-size", "4", "--no-progress"]
    assert vprhub_main(argv + ["--json", str(out)]) == 0
    entry = json.loads(out.read_text())["datasets"][str(root)]
    reference = brute_force_recalls(
        direct_descriptors(megaloc_dir, benchmark.database_paths),
        direct_descriptors(megaloc_dir, benchmark.query_paths),
        benchmark.positives,
        (1, 5, 10),
    )
    assert {k: entry[f"recall@{k}"] for k in (1, 5, 10)} == reference
    capsys.readouterr()
    assert vprhub_main(argv + ["--rerank"]) == 2
    assert "MegaLocModel returns no `local_features`; re-ranking needs a model that does" in capsys.readouterr().err


def test_model_card_describes_the_projection(megaloc_dir):
    model = AutoModel.from_pretrained(megaloc_dir)
    processor = AutoImageProcessor.from_pretrained(megaloc_dir)
    text = hub.render_model_card(model, "org/megaloc", processor, conversion={"checkpoint": "model.safetensors"})
    assert "| `projection_dim` | `64` | width of the linear projection" in text
    assert "| `num_clusters` | `8` | number of clusters m. |" in text  # documented by SALAD's config
    assert "2 of its 2 blocks fine-tuned" in text and "a 160-d vector. A learned linear layer maps it to 64" in text
    assert "MIT license" in text and "Berton_2025_MegaLoc" in text
    assert ModelCard(text).data.datasets == ["GSV-Cities", "MSLS", "MegaScenes", "ScanNet", "SF-XL"]


def test_inputs_not_multiples_of_14_are_resized_by_the_processor(megaloc_dir):
    """The official forward resizes such inputs itself; vprhub's model refuses them and its processor resizes."""
    model = AutoModel.from_pretrained(megaloc_dir).eval()
    with pytest.raises(ValueError, match="image height and width must be multiples of 14, got 100x130"):
        model(torch.randn(1, 3, 100, 130))
    processor = AutoImageProcessor.from_pretrained(megaloc_dir)
    pixels = processor(Image.new("RGB", (130, 100), "gray"), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 56, 56)  # the config's image_size, whatever the photo's
