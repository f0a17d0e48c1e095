"""MegaLoc: conversion refusals and the projection head (parity is in test_megaloc_parity.py)."""

import pytest
import torch
from safetensors.torch import save_file

import vprhub
from vprhub.cli import main as vprhub_main
from parity import load_manifest, regenerate_weights


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
    model = vprhub.build_model("megaloc", backbone_config=vprhub.modeling.backbone.tiny_dinov2_config(num_hidden_layers=3))
    assert model.config.num_trainable_blocks == 3
    assert all(p.requires_grad for p in model.parameters())
    assert vprhub.MegaLocConfig().num_trainable_blocks == 12  # ViT-B/14, as released
