"""MegaLoc against the official implementation's outputs (tests/fixtures/parity/megaloc)."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

import vprhub
from vprhub.cli import main as vprhub_main
from parity import assert_close, load_expected, load_manifest, make_inputs, regenerate_weights, tolerance
from without_vprhub import run_without_vprhub

INPUTS = ["x322x322", "x224x308"]


@pytest.fixture(scope="module")
def manifest():
    return load_manifest("megaloc")


@pytest.fixture(scope="module")
def checkpoint(manifest, tmp_path_factory):
    """The official weights written as the released ``model.safetensors`` (plain state_dict, no prefix)."""
    path = tmp_path_factory.mktemp("megaloc-release") / "model.safetensors"
    save_file(regenerate_weights(manifest), str(path))
    return path


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("megaloc") / "megaloc-dinov2"
    assert vprhub_main(["convert", "megaloc", str(checkpoint), str(out)]) == 0
    return out


def test_converted_folder_loads_with_auto_classes(converted):
    model = AutoModel.from_pretrained(converted)
    assert type(model) is vprhub.MegaLocModel
    config = model.config
    assert config.model_type == "megaloc"
    assert (config.backbone_config.hidden_size, config.backbone_config.num_hidden_layers) == (384, 2)
    assert config.backbone_config.num_attention_heads == 6
    assert not config.backbone_config.use_mask_token  # the released ViT has none
    assert (config.num_clusters, config.cluster_dim, config.token_dim, config.head_hidden_dim) == (32, 64, 128, 256)
    assert (config.aggregation_dim, config.projection_dim, config.descriptor_dim) == (2176, 512, 512)
    assert config.pos_embed_rule == "dinov2_hub"
    # every block is trained, the embeddings too
    assert model.num_frozen_layers == 0
    assert all(p.requires_grad for p in model.parameters())
    processor = AutoImageProcessor.from_pretrained(converted)
    assert processor.size == {"height": 322, "width": 322}
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    # the code travels with the weights: MegaLoc's modules and the SALAD ones they build on
    code = {p.name for p in converted.glob("*.py")}
    assert {"configuration_megaloc.py", "modeling_megaloc.py", "configuration_salad.py", "modeling_salad.py"} <= code


@pytest.mark.parametrize("name", INPUTS)
def test_outputs_match_official(manifest, converted, name):
    model = AutoModel.from_pretrained(converted).eval()
    expected = load_expected("megaloc")
    with torch.no_grad():
        out = model(make_inputs(manifest)[name])

    def check(actual, key):
        return assert_close(actual, expected[f"{name}.{key}"], tolerance(manifest, f"{name}.{key}"), key)

    diffs = {
        "descriptor": check(out.descriptors, "descriptor"),
        "salad_descriptor": check(out.aggregation, "salad_descriptor"),
        "backbone_t": check(out.token, "backbone_t"),
        "backbone_f": check(out.feature_map, "backbone_f"),
    }
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert out.descriptors.dtype == torch.float32


def test_transformers_rule_is_detected(manifest, converted):
    """The output-size interpolation rule moves the descriptors well past the tolerance."""
    model = AutoModel.from_pretrained(converted, pos_embed_rule="transformers").eval()
    with torch.no_grad():
        out = model(make_inputs(manifest)["x224x308"])
    diff = (out.descriptors - load_expected("megaloc")["x224x308.descriptor"]).abs().max().item()
    assert diff > 10 * tolerance(manifest, "x224x308.descriptor")


def test_converted_folder_loads_without_vprhub(manifest, converted, tmp_path):
    """``trust_remote_code=True`` in a process where ``import vprhub`` fails reproduces the official descriptor."""
    torch.save({"pixels": make_inputs(manifest)["x224x308"]}, tmp_path / "inputs.pt")
    script = """
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__name__ == "MegaLocModel", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            out = model(torch.load(sys.argv[2], weights_only=True)["pixels"])
        torch.save({"descriptors": out.descriptors, "aggregation": out.aggregation}, sys.argv[3])
        """
    args = [str(converted), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    result = run_without_vprhub(script, args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = load_expected("megaloc")
    for key, name in (("descriptors", "descriptor"), ("aggregation", "salad_descriptor")):
        tol = tolerance(manifest, f"x224x308.{name}")
        assert_close(out[key], expected[f"x224x308.{name}"], tol, name)
