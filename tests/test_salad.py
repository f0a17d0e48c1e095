"""SALAD behaviour beyond parity: saving, freezing, precision, backbone loading, bad input."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, Dinov2Model

import vprhub
from vprhub.modeling import mark_trainable
from vprhub.modeling.aggregation import sinkhorn_with_dustbin
from vprhub.modeling.backbone import tiny_dinov2_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vprhub.build_model("salad").eval()


def test_descriptors_are_unit_float32(model):
    out = model(torch.randn(3, 3, 224, 182))
    assert out.descriptors.shape == (3, model.config.descriptor_dim)
    assert out.descriptors.dtype == torch.float32
    torch.testing.assert_close(out.descriptors.norm(dim=-1), torch.ones(3))
    assert out.feature_map.shape == (3, 64, 16, 13)
    assert out.assignment.shape == (3, model.config.num_clusters, 16 * 13)


def test_save_pretrained_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    vprhub.vpr_image_processor(*model.config.image_size).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert len(load_file(str(tmp_path / "model.safetensors"))) == len(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x).descriptors, reloaded(x).descriptors)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "salad"
    assert AutoImageProcessor.from_pretrained(tmp_path).size == {"height": 224, "width": 224}


def test_early_blocks_are_frozen_and_get_no_gradient():
    model = vprhub.build_model("salad", backbone_config=tiny_dinov2_config(num_hidden_layers=3), num_trainable_blocks=1)
    mark_trainable(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith(("backbone.embeddings", "backbone.encoder.layer.0.", "backbone.encoder.layer.1.")) for n in frozen
    )
    model.train()
    model(torch.randn(2, 3, 224, 224)).descriptors.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert model.backbone.encoder.layer[2].mlp.fc1.weight.grad is not None


def test_loaded_model_is_frozen_only_by_mark_trainable(tmp_path):
    """Loading freezes nothing (as any transformers model); mark_trainable gives the same choice on both."""
    model = vprhub.build_model("salad", backbone_config=tiny_dinov2_config(num_hidden_layers=3), num_trainable_blocks=1)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert all(p.requires_grad for p in reloaded.parameters())
    assert mark_trainable(reloaded) == mark_trainable(model)
    expected = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in reloaded.named_parameters()} == expected
    assert not all(expected.values())


def test_zero_trainable_blocks_freezes_every_block():
    """0 means no trainable block (the official slicing would make it "all")."""
    model = vprhub.build_model("salad", num_trainable_blocks=0)
    mark_trainable(model)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable == ["layernorm.weight", "layernorm.bias"]
    assert all(p.requires_grad for p in model.aggregator.parameters())


def test_final_norm_switch_changes_tokens(model):
    x = torch.randn(1, 3, 224, 224)
    no_norm = vprhub.SaladModel(vprhub.SaladConfig(**{**model.config.to_dict(), "final_norm": False})).eval()
    no_norm.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(x).token, no_norm(x).token)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sinkhorn_is_computed_in_float32_under_autocast(dtype):
    torch.manual_seed(0)
    scores = torch.randn(2, 8, 100) * 20
    reference = sinkhorn_with_dustbin(scores, torch.tensor(1.0), 3)
    with torch.autocast("cpu", dtype=dtype):
        low = sinkhorn_with_dustbin(scores.to(dtype), torch.tensor(1.0), 3)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # Not a parity tolerance: the scores themselves were rounded to 8 (bf16) / 11 (fp16) bits
    # before Sinkhorn, which moves assignments of logits ~20 by up to ~1e-2.
    torch.testing.assert_close(low, reference, atol=2e-2, rtol=0)


def test_sinkhorn_converges_to_the_marginals():
    """Columns (patches) carry unit mass incl. the dustbin; converged cluster rows carry one each."""
    scores = torch.randn(3, 8, 50)
    plan = sinkhorn_with_dustbin(scores, torch.tensor(0.5), 200)
    dustbin_row = 1 - plan.sum(1)
    assert (dustbin_row > 0).all()
    # Columns are exact after every iteration; rows only converge, hence 1e-3 after 200 iterations.
    torch.testing.assert_close(dustbin_row.sum(1), torch.full((3,), 50.0 - 8.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(plan.sum(2), torch.ones(3, 8), atol=1e-4, rtol=0)


def test_autocast_forward_gives_float32_unit_descriptors(model):
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.descriptors.dtype == torch.float32
    torch.testing.assert_close(out.descriptors.norm(dim=-1), torch.ones(2))


def test_backbone_from_local_dinov2_folder(tmp_path):
    dinov2 = Dinov2Model(tiny_dinov2_config())
    dinov2.save_pretrained(tmp_path / "dinov2")
    model = vprhub.build_model(
        "salad", backbone=str(tmp_path / "dinov2"), num_clusters=8, cluster_dim=16, token_dim=32, image_size=[224, 224]
    )
    for name, tensor in dinov2.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 224, 220), "multiples of 14"), ((1, 1, 224, 224), "3 channels"), ((3, 224, 224), "batch, channels")],
)
def test_bad_pixel_values_are_refused(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_too_few_patches_for_the_clusters(model):
    with pytest.raises(ValueError, match="more patches than clusters"):
        model(torch.randn(1, 3, 28, 28))


def test_unknown_model_type():
    with pytest.raises(ValueError, match="choose one of"):
        vprhub.build_model("netvlad")
