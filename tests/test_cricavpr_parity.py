"""CricaVPR against the official implementation's outputs (tests/fixtures/parity/cricavpr)."""

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

import vprhub
from vprhub.cli import main as vprhub_main
from parity import assert_close, load_expected, load_manifest, make_inputs, regenerate_weights, tolerance


@pytest.fixture(scope="module")
def manifest():
    return load_manifest("cricavpr")


@pytest.fixture(scope="module")
def converted(manifest, tmp_path_factory):
    """The official weights written as the released file would hold them, then converted with the CLI."""
    work = tmp_path_factory.mktemp("cricavpr")
    checkpoint = work / "CricaVPR.pth"
    state_dict = {f"module.{k}": v for k, v in regenerate_weights(manifest).items()}
    torch.save({"epoch_num": 7, "model_state_dict": state_dict, "best_r5": 90.0, "not_improved_num": 0}, checkpoint)
    out = work / "cricavpr-dinov2"
    assert vprhub_main(["convert", "cricavpr", str(checkpoint), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def outputs(manifest, converted):
    """Official-fixture inputs through the converted model: batch of 4, first 2, and independent mode."""
    model = AutoModel.from_pretrained(converted).eval()
    x = make_inputs(manifest)["x224"]
    with torch.no_grad():
        return {"x224": model(x), "x224_first2": model(x[:2]), "independent": model(x, batch_mode="independent")}


def test_converted_folder_loads_with_auto_classes(converted):
    model = AutoModel.from_pretrained(converted)
    assert isinstance(model, vprhub.CricaVPRModel)
    config = model.config
    backbone = config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads) == (768, 2, 12)
    assert config.adapter_dim == 384
    assert config.adapter_channels == dict(branch1x1=192, reduce3x3=24, branch3x3=96, reduce5x5=24, branch5x5=96)
    assert (config.adapter_scale, config.adapter_bn_eps) == (0.2, 1e-3)
    assert (config.encoder_num_layers, config.encoder_num_heads, config.encoder_ffn_dim) == (2, 16, 2048)
    assert config.batch_mode == "batch" and config.pos_embed_rule == "dinov2_hub"
    assert config.descriptor_dim == 10752
    processor = AutoImageProcessor.from_pretrained(converted)
    assert processor.size == {"height": 224, "width": 224}


@pytest.mark.parametrize("name", ["x224", "x224_first2"])
def test_descriptors_match_official(manifest, outputs, name):
    key = f"{name}.descriptor"
    diff = assert_close(outputs[name].descriptors, load_expected("cricavpr")[key], tolerance(manifest, key), key)
    print(f"{key}: max abs diff {diff:.2e}")


def test_encoder_input_and_patch_tokens_match_official(manifest, outputs):
    expected, out = load_expected("cricavpr"), outputs["x224"]
    patch_tokens = out.feature_map.flatten(2).transpose(1, 2)
    diffs = {
        name: assert_close(actual, expected[f"x224.{name}"], tolerance(manifest, f"x224.{name}"), name)
        for name, actual in (("encoder_input", out.encoder_input), ("patch_tokens_sub", patch_tokens[:, :, ::24]))
    }
    print({k: f"{v:.2e}" for k, v in diffs.items()})


def test_batch_dependent_vs_independent_descriptors(manifest, outputs):
    """Independent mode = each image in a batch of one; the official run measured that change too."""
    batch, first2, independent = (outputs[k].descriptors for k in ("x224", "x224_first2", "independent"))
    change = (batch - independent).abs().max().item()
    composition = (batch[:2] - first2).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(batch, independent, dim=-1)
    print(
        f"batch of 4 vs independent: max abs {change:.4e}, cosine {[round(c, 4) for c in cosine.tolist()]}; "
        f"first 2 in batch of 4 vs batch of 2: max abs {composition:.4e}"
    )
    official = manifest["batch_dependence"]
    assert change == pytest.approx(official["max_abs_diff_batch4_vs_batch1"], abs=1e-6)
    assert composition == pytest.approx(official["max_abs_diff_first2_in_batch4_vs_batch2"], abs=1e-6)
    torch.testing.assert_close(cosine, torch.tensor(official["cosine_batch4_vs_batch1"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["independent"].encoder_input, outputs["x224"].encoder_input, rtol=0, atol=0)


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    """A SelaVPR-style checkpoint (adapter1/adapter2, no cross-image encoder) gives a clear error, no output."""
    state_dict = {
        "module.backbone.cls_token": torch.zeros(1, 1, 8),
        "module.backbone.blocks.0.adapter1.D_fc1.weight": torch.zeros(4, 8),
        "module.aggregation.1.p": torch.ones(1),
    }
    checkpoint = tmp_path / "SelaVPR_msls.pth"
    torch.save({"model_state_dict": state_dict}, checkpoint)
    out = tmp_path / "out"
    assert vprhub_main(["convert", "cricavpr", str(checkpoint), str(out)]) == 2
    error = capsys.readouterr().err
    assert "not a CricaVPR checkpoint" in error and "backbone.blocks.0.adapter.D_fc1.weight" in error
    assert str(checkpoint) in error and not out.exists()
