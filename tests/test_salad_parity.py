"""SALAD against the official implementation's outputs (tests/fixtures/parity/salad)."""

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

import vprhub
from vprhub.cli import main as vprhub_main
from parity import assert_close, load_expected, load_manifest, make_inputs, regenerate_weights, tolerance


@pytest.fixture(scope="module")
def manifest():
    return load_manifest("salad")


@pytest.fixture(scope="module")
def converted(manifest, tmp_path_factory):
    """The official weights written as the released file (a plain state_dict), then converted."""
    work = tmp_path_factory.mktemp("salad")
    checkpoint = work / "dino_salad.ckpt"
    torch.save(regenerate_weights(manifest), checkpoint)
    out = work / "salad-dinov2"
    assert vprhub_main(["convert", "salad", str(checkpoint), str(out)]) == 0
    return out


def test_converted_folder_loads_with_auto_classes(converted):
    model = AutoModel.from_pretrained(converted)
    assert isinstance(model, vprhub.SaladModel)
    config = model.config
    assert (config.backbone_config.hidden_size, config.backbone_config.num_hidden_layers) == (384, 2)
    assert config.backbone_config.num_attention_heads == 6
    assert (config.num_clusters, config.cluster_dim, config.token_dim) == (64, 128, 256)
    assert config.pos_embed_rule == "dinov2_hub"
    processor = AutoImageProcessor.from_pretrained(converted)
    assert processor.size == {"height": 322, "width": 322}


@pytest.mark.parametrize("name", ["x322", "x224"])
def test_outputs_match_official(manifest, converted, name):
    model = AutoModel.from_pretrained(converted).eval()
    expected = load_expected("salad")
    with torch.no_grad():
        out = model(make_inputs(manifest)[name])
    diffs = {
        "descriptor": assert_close(out.descriptors, expected[f"{name}.descriptor"], tolerance(manifest, f"{name}.descriptor"), "descriptor"),
        "backbone_t": assert_close(out.token, expected[f"{name}.backbone_t"], tolerance(manifest, f"{name}.backbone_t"), "token"),
        "backbone_f_sub": assert_close(
            out.feature_map[:, ::8], expected[f"{name}.backbone_f_sub"], tolerance(manifest, f"{name}.backbone_f_sub"), "feature map"
        ),
        "assignment": assert_close(out.assignment, expected[f"{name}.assignment"], tolerance(manifest, f"{name}.assignment"), "assignment"),
    }
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert out.descriptors.dtype == torch.float32


def test_transformers_rule_is_detected(manifest, converted):
    """The output-size interpolation rule moves descriptors well past the tolerance."""
    model = AutoModel.from_pretrained(converted, pos_embed_rule="transformers").eval()
    with torch.no_grad():
        out = model(make_inputs(manifest)["x224"])
    diff = (out.descriptors - load_expected("salad")["x224.descriptor"]).abs().max().item()
    assert diff > 10 * tolerance(manifest, "x224.descriptor")
