"""SelaVPR behaviour beyond parity: shapes, adapter wiring and initialisation, freezing, saving,
configuration, bad input and conversion errors (tiny random models)."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, Dinov2Model, Dinov2WithRegistersConfig

import vprhub
from vprhub.modeling import mark_trainable
from vprhub.cli import main as vprhub_main
from vprhub.conversion import convert_state_dict
from vprhub.modeling.backbone import tiny_dinov2_config

HIDDEN, LAYERS = 64, 2  # the tiny backbone


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vprhub.build_model("selavpr").eval()


def randomise_adapters(model, which=("serial", "parallel")):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(f".adapters.{w}." in name for w in which):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def plain_dinov2(model) -> Dinov2Model:
    """transformers' Dinov2 holding the SelaVPR backbone's own (non-adapter) weights."""
    plain = Dinov2Model(model.config.backbone_config).eval()
    weights = {k: v for k, v in model.backbone.state_dict().items() if ".adapters." not in k}
    plain.load_state_dict(weights, strict=True)
    return plain


def test_outputs_for_a_non_square_input(model):
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 182))
    assert out.descriptors.shape == (2, HIDDEN) and out.descriptors.dtype == torch.float32
    torch.testing.assert_close(out.descriptors.norm(dim=-1), torch.ones(2))
    assert out.local_features.shape == (2, 4 * 16 - 3, 4 * 13 - 3, model.config.local_dim)
    torch.testing.assert_close(out.local_features.norm(dim=-1), torch.ones(2, 61, 49))
    assert out.patch_tokens.shape == (2, 16 * 13, HIDDEN)


def test_global_descriptor_is_gem_of_normalised_tokens(model):
    with torch.no_grad():
        model.gem.p.fill_(2.5)
        out = model(torch.randn(2, 3, 98, 126))
    tokens = torch.nn.functional.normalize(out.patch_tokens, dim=-1).clamp(min=1e-6)
    expected = torch.nn.functional.normalize(tokens.pow(2.5).mean(dim=1).pow(1 / 2.5), dim=-1)
    torch.testing.assert_close(out.descriptors, expected)


def test_new_model_is_plain_dinov2_at_step_zero(model):
    for adapter in model.adapter_modules():
        assert not adapter.up_proj.weight.any() and not adapter.up_proj.bias.any()
        assert adapter.down_proj.weight.std() > 0.01
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(x).patch_tokens
        plain = plain_dinov2(model)(x).last_hidden_state[:, 1:]
    assert torch.equal(ours, plain)


def test_adapters_are_wired_as_selavpr_blocks(model):
    """Serial adapter on the attention output, parallel adapter scaled by s beside the MLP."""
    randomise_adapters(model)
    layer = model.backbone.encoder.layer[0]
    serial, parallel = layer.adapters["serial"], layer.adapters["parallel"]
    hidden = torch.randn(2, 17, HIDDEN)
    with torch.no_grad():  # `.forward` runs the Dinov2 submodules without the adapter hooks
        attention = layer.attention.forward(layer.norm1(hidden))[0]
        mid = hidden + layer.layer_scale1(attention + serial.up_proj(torch.relu(serial.down_proj(attention))))
        y = layer.norm2(mid)
        side = parallel.up_proj(torch.relu(parallel.down_proj(y)))
        expected = mid + layer.layer_scale2(layer.mlp.forward(y) + model.config.parallel_adapter_scale * side)
        torch.testing.assert_close(layer(hidden), expected)


def test_parallel_scale_is_taken_from_the_config():
    torch.manual_seed(0)
    model = vprhub.build_model("selavpr", parallel_adapter_scale=0.0).eval()
    randomise_adapters(model, which=("parallel",))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x).patch_tokens, plain_dinov2(model)(x).last_hidden_state[:, 1:])
        randomise_adapters(model, which=("serial",))
        assert not torch.allclose(model(x).patch_tokens, plain_dinov2(model)(x).last_hidden_state[:, 1:])


def test_only_adapters_and_heads_train(model):
    counts = mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("gem.", "local_head.")) or ".adapters." in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".adapters." not in n)
    bottleneck = HIDDEN // 2
    adapters = LAYERS * 2 * (2 * HIDDEN * bottleneck + bottleneck + HIDDEN)
    head = HIDDEN * 32 * 9 + 32 + 32 * 16 * 9 + 16  # tiny local head 64 -> 32 -> 16
    total = sum(p.numel() for p in model.parameters())
    assert counts == (adapters + 1 + head, total)

    model.train()
    out = model(torch.randn(2, 3, 224, 224))
    (out.descriptors.sum() + out.local_features.sum()).backward()
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if ".adapters." not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert model.adapter_modules()[0].up_proj.weight.grad.abs().sum() > 0


def test_save_and_from_pretrained_keep_weights_freezing_and_outputs(model, tmp_path):
    randomise_adapters(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, vprhub.SelaVPRModel)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "selavpr"
    assert mark_trainable(reloaded) == mark_trainable(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x).local_features, reloaded(x).local_features)


def test_pretrained_dinov2_backbone_is_loaded_and_adapters_start_at_zero(tmp_path):
    torch.manual_seed(3)
    Dinov2Model(tiny_dinov2_config()).save_pretrained(tmp_path)
    model = vprhub.build_model("selavpr", backbone=str(tmp_path), local_hidden_dim=32, local_dim=16).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(tmp_path).eval()(x).last_hidden_state[:, 1:]
        assert torch.equal(model(x).patch_tokens, expected)
    assert mark_trainable(model)[0] < sum(p.numel() for p in model.parameters())


def test_registers_are_excluded_from_patch_tokens():
    config = Dinov2WithRegistersConfig(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, image_size=224, patch_size=14, num_register_tokens=4
    )
    model = vprhub.build_model("selavpr", backbone_config=config).eval()
    randomise_adapters(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 140, 84))
    assert out.patch_tokens.shape == (1, 10 * 6, HIDDEN)
    assert out.local_features.shape == (1, 37, 21, 16)


def test_adapter_width_follows_the_ratio():
    model = vprhub.build_model("selavpr", adapter_ratio=0.25)
    assert model.config.adapter_dim == 16
    assert model.adapter_modules()[0].down_proj.weight.shape == (16, HIDDEN)
    assert vprhub.SelaVPRConfig().adapter_dim == 512  # ViT-L default, ratio 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(adapter_ratio=0.001), "no bottleneck channel"),
        (dict(adapter_ratio=-0.5), "adapter_ratio must be > 0"),
        (dict(local_dim=0), "local_dim"),
        (dict(gem_p=0.0), "gem_p"),
        (dict(image_size=[224, 220]), "multiples of 14"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        vprhub.SelaVPRConfig(backbone_config=tiny_dinov2_config(), **overrides)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 224, 220), "multiples of 14"), ((1, 1, 224, 224), "channels"), ((3, 224, 224), r"\[batch, channels")],
)
def test_bad_pixel_values_are_refused(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape))


def test_checkpoints_of_other_models_are_refused(tmp_path):
    salad = {"backbone.model.cls_token": torch.zeros(1, 1, 64), "aggregator.dust_bin": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="not a SelaVPR checkpoint"):
        convert_state_dict("selavpr", salad)
    cricavpr = {
        "module.backbone.cls_token": torch.zeros(1, 1, 64),
        "module.backbone.blocks.0.adapter.D_fc1.weight": torch.zeros(32, 64),
        "module.aggregation.1.p": torch.ones(1),
        "module.encoder.layers.0.linear1.weight": torch.zeros(8, 64),
    }
    with pytest.raises(ValueError, match="LocalAdapt"):
        convert_state_dict("selavpr", cricavpr)

    checkpoint, out = tmp_path / "CricaVPR.pth", tmp_path / "out"
    torch.save({"model_state_dict": cricavpr}, checkpoint)
    assert vprhub_main(["convert", "selavpr", str(checkpoint), str(out)]) == 2
    assert not out.exists()


def test_adapters_train_under_activation_checkpointing(model):
    randomise_adapters(model)
    mark_trainable(model)
    model.activation_checkpointing_enable()
    model.train()
    out = model(torch.randn(2, 3, 224, 224))
    (out.descriptors.sum() + out.local_features.sum()).backward()
    assert all(layer.gradient_checkpointing for layer in model.backbone.encoder.layer)
    assert all(a.down_proj.weight.grad.abs().sum() > 0 for a in model.adapter_modules())
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if ".adapters." not in n)
