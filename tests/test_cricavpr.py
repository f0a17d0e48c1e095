"""CricaVPR on a tiny random backbone: cells, adapter, batch semantics, freezing, save/load."""

import logging

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import AutoModel

import vprhub
from vprhub.modeling import mark_trainable
from vprhub.modeling.backbone import build_backbone, run_backbone
from vprhub.modeling.grid_pooling import GridGeM, grid_cell_bounds


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = vprhub.build_model("cricavpr").eval()
    with torch.no_grad():  # non-zero adapters, so they matter in every test below
        for adapter in model.mulconv_adapters():
            adapter.up_proj.weight.normal_(0, 0.2)
    return model


def images(batch, height=112, width=98, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- cells ---------------------------------------------------------------------------------------


def test_cells_are_the_official_ones_on_a_16x16_grid():
    assert grid_cell_bounds(16, 2) == [0, 8, 16]
    assert grid_cell_bounds(16, 3) == [0, 5, 11, 16]


def test_cells_cover_each_side_in_near_equal_parts():
    for splits in range(1, 6):
        for size in range(splits, 41):
            bounds = grid_cell_bounds(size, splits)
            lengths = np.diff(bounds)
            assert bounds[0] == 0 and bounds[-1] == size
            assert lengths.min() >= 1 and lengths.max() - lengths.min() <= 1, (size, splits)
            # each boundary is i * n / k rounded half up
            assert all(-0.5 < b - i * size / splits <= 0.5 for i, b in enumerate(bounds)), (size, splits)


@pytest.mark.parametrize("grid", [(16, 16), (7, 5), (3, 11)])
def test_grid_gem_matches_a_per_cell_loop(grid):
    tokens = torch.randn(2, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(1))
    pooling = GridGeM((2, 3), p=2.5)
    with torch.no_grad():
        actual = pooling(tokens, grid).numpy()
    unit = tokens.numpy() / np.linalg.norm(tokens.numpy(), axis=-1, keepdims=True)
    fmap = np.clip(unit.reshape(2, grid[0], grid[1], 8), 1e-6, None) ** 2.5
    expected = []
    for k in (2, 3):
        rows, cols = grid_cell_bounds(grid[0], k), grid_cell_bounds(grid[1], k)
        for i in range(k):
            for j in range(k):
                cell = fmap[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
                expected.append(cell.mean(axis=(1, 2)) ** (1 / 2.5))
    np.testing.assert_allclose(actual, np.stack(expected, axis=1), rtol=1e-5, atol=1e-7)


def test_grid_too_small_for_the_3x3_split(model):
    with pytest.raises(ValueError, match=r"patch grid 2x3 is too small for the 3x3 split.*42x42 pixels"):
        model(images(1, 28, 42))


# --- adapter -------------------------------------------------------------------------------------


def test_adapter_matches_a_reference_on_a_non_square_grid(model):
    """Patch tokens go through the branches on the row-major h x w map; the class token becomes 2 * x0."""
    adapter = model.mulconv_adapters()[0]
    grid = (5, 3)
    model.backbone.embeddings(images(2, 70, 42))  # the embeddings' hook records the grid
    hidden = torch.randn(2, 1 + 15, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        actual = adapter(hidden)
        x0 = torch.relu(adapter.down_proj(hidden))
        fmap = torch.zeros(2, x0.shape[-1], *grid)
        for r in range(grid[0]):
            for c in range(grid[1]):
                fmap[:, :, r, c] = x0[:, 1 + r * grid[1] + c]

        def conv_bn_relu(block, x):
            x = nn.functional.conv2d(x, block.conv.weight, block.conv.bias, padding=block.conv.kernel_size[0] // 2)
            norm = block.norm
            x = (x - norm.running_mean[:, None, None]) / torch.sqrt(norm.running_var[:, None, None] + 1e-3)
            return torch.relu(x * norm.weight[:, None, None] + norm.bias[:, None, None])

        mixed = torch.cat(
            [
                conv_bn_relu(adapter.branch1x1, fmap),
                conv_bn_relu(adapter.branch3x3[1], conv_bn_relu(adapter.branch3x3[0], fmap)),
                conv_bn_relu(adapter.branch5x5[1], conv_bn_relu(adapter.branch5x5[0], fmap)),
            ],
            dim=1,
        )
        patches = torch.stack([mixed[:, :, r, c] for r in range(grid[0]) for c in range(grid[1])], dim=1)
        expected = adapter.up_proj(torch.cat((2 * x0[:, :1], patches + x0[:, 1:]), dim=1))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_adapter_outside_its_backbone_needs_the_grid():
    adapter = vprhub.build_model("cricavpr").mulconv_adapters()[0]
    with pytest.raises(ValueError, match="needs the patch grid"):
        adapter(torch.randn(1, 17, 64))


def test_new_model_computes_plain_dinov2():
    """Zero up-projections: the backbone with adapters equals the same Dinov2 without them."""
    model = vprhub.build_model("cricavpr").eval()
    assert all(not a.up_proj.weight.any() and not a.up_proj.bias.any() for a in model.mulconv_adapters())
    plain = build_backbone(model.config.backbone_config, model.config.pos_embed_rule).eval()
    plain.load_state_dict({k: v for k, v in model.backbone.state_dict().items() if ".adapters." not in k})
    x = images(2, 238, 196)
    with torch.no_grad():
        torch.testing.assert_close(run_backbone(model.backbone, x), run_backbone(plain, x), rtol=0, atol=0)


def test_backbone_frozen_adapters_and_heads_trainable(model):
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n, _ in model.backbone.named_parameters()}
    assert trainable == {f"backbone.{n}" for n in backbone if ".adapters.mulconv." in n} | {
        n for n, _ in model.named_parameters() if not n.startswith("backbone.")
    }
    assert any(n.startswith("encoder.") for n in trainable) and "pooling.p" in trainable


def _expected_counts(hidden, depth, mlp, bottleneck, c1, r3, c3, r5, c5, enc_layers, ffn, patch=14, positions=37 * 37):
    """Parameter counts from the architecture description (Dinov2 ViT + adapters + encoder + GeM p)."""
    vit = hidden * (3 * patch * patch + 1) + hidden * (1 + 1 + positions) + hidden  # patch embed, cls, pos, mask
    block = 4 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) + 2 * hidden
    block += hidden * mlp + mlp + mlp * hidden + hidden
    vit += depth * block + 2 * hidden

    def conv(cin, cout, k):
        return cin * cout * k * k + cout + 2 * cout  # conv weight + bias, batch-norm weight + bias

    adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
    adapter += conv(bottleneck, c1, 1) + conv(bottleneck, r3, 1) + conv(r3, c3, 3)
    adapter += conv(bottleneck, r5, 1) + conv(r5, c5, 5)
    encoder = enc_layers * (4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden)
    trainable = depth * adapter + encoder + 1
    return trainable, vit + trainable


def test_parameter_counts_tiny(model):
    assert mark_trainable(model) == _expected_counts(64, 2, 128, 32, 16, 2, 8, 2, 8, 2, 128, positions=16 * 16)


def test_parameter_counts_vit_b_depth_12():
    with torch.device("meta"):
        full = vprhub.CricaVPRModel(vprhub.CricaVPRConfig())
    counts = mark_trainable(full)
    assert counts == _expected_counts(768, 12, 3072, 384, 192, 24, 96, 24, 96, 2, 2048)
    print(f"CricaVPR ViT-B/14 depth 12: trainable {counts[0]:,} / total {counts[1]:,}")


def test_training_step_updates_adapters_and_batch_norm():
    model = vprhub.build_model("cricavpr")
    mark_trainable(model)
    with torch.no_grad():
        model.mulconv_adapters()[0].up_proj.weight.normal_(0, 0.2)
    model.train()
    running = model.mulconv_adapters()[0].branch1x1.norm.running_mean.clone()
    model(images(3)).descriptors.sum().backward()
    adapter = model.mulconv_adapters()[0]
    assert adapter.down_proj.weight.grad.abs().sum() > 0 and adapter.branch5x5[1].conv.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    assert model.backbone.encoder.layer[0].attention.q_proj.weight.grad is None
    assert not torch.equal(adapter.branch1x1.norm.running_mean, running)


# --- forward and batch semantics -----------------------------------------------------------------


def test_non_224_input(model):
    with torch.no_grad():
        out = model(images(3, 280, 252))
    assert out.descriptors.shape == (3, 14 * 64) and out.descriptors.dtype == torch.float32
    assert out.feature_map.shape == (3, 64, 20, 18) and out.encoder_input.shape == (3, 14, 64)
    torch.testing.assert_close(out.descriptors.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.token, out.encoder_input[:, 0], rtol=0, atol=0)


def test_batch_mode_semantics(model):
    x = images(4, seed=3)
    with torch.no_grad():
        batch = model(x).descriptors
        first2 = model(x[:2]).descriptors
        reversed_ = model(x.flip(0)).descriptors.flip(0)
        independent = model(x, batch_mode="independent").descriptors
        alone = torch.cat([model(x[i : i + 1], batch_mode="independent").descriptors for i in range(4)])
    torch.testing.assert_close(independent, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(reversed_, batch, rtol=0, atol=1e-6)  # equivariant to the batch order
    assert (first2 - batch[:2]).abs().max() > 1e-3  # batch mode: depends on the other images
    assert (independent - batch).abs().max() > 1e-3


def test_batch_of_one_in_batch_mode_equals_independent_and_warns(model, caplog):
    logging.Logger.warning_once.cache_clear()
    x = images(1, seed=4)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        single = model(x).descriptors
        model(x)
    warnings = [r for r in caplog.records if "batch of one image" in r.getMessage()]
    assert len(warnings) == 1
    with torch.no_grad():
        torch.testing.assert_close(single, model(x, batch_mode="independent").descriptors, rtol=0, atol=1e-6)


def test_bad_batch_mode(model):
    with pytest.raises(ValueError, match="batch_mode must be one of"):
        model(images(2), batch_mode="cross")
    with pytest.raises(StrictDataclassClassValidationError, match="batch_mode must be one of"):
        vprhub.CricaVPRConfig(batch_mode="cross")


def test_branch_widths_must_fill_the_bottleneck():
    with pytest.raises(StrictDataclassClassValidationError, match="add up to the bottleneck"):
        vprhub.CricaVPRConfig(adapter_branch_fractions=[0.5, 0.25, 0.125])


def test_batch_mode_and_weights_survive_save_pretrained(model, tmp_path):
    model.config.batch_mode = "independent"
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.batch_mode = "batch"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, vprhub.CricaVPRModel) and loaded.config.batch_mode == "independent"
    assert torch.equal(loaded.mulconv_adapters()[1].up_proj.weight, model.mulconv_adapters()[1].up_proj.weight)
    x = images(3, seed=5)
    with torch.no_grad():
        expected = model(x, batch_mode="independent").descriptors
        torch.testing.assert_close(loaded(x).descriptors, expected, rtol=0, atol=0)


def test_adapters_start_as_the_official_training_script_sets_them():
    """Up-projection zero, every MulConv convolution weight and bias 1e-5 (Lu-Feng/CricaVPR train.py)."""
    model = vprhub.build_model("cricavpr")
    for adapter in model.mulconv_adapters():
        assert not adapter.up_proj.weight.any() and not adapter.up_proj.bias.any()
        convolutions = [m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convolutions) == 5
        for conv in convolutions:
            assert torch.equal(conv.weight, torch.full_like(conv.weight, 1e-5))
            assert torch.equal(conv.bias, torch.full_like(conv.bias, 1e-5))
