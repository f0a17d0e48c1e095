"""SelaVPR against the official implementation (tests/fixtures/parity/selavpr) and an independent
re-implementation of the official computation (for inputs the official code cannot take)."""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoImageProcessor, AutoModel, Dinov2WithRegistersConfig

import vprhub
from vprhub.cli import main as vprhub_main
from vprhub.conversion import convert_state_dict
from vprhub.modeling import mark_trainable
from vprhub.modeling.local_matching import rerank
from parity import (
    assert_close,
    load_expected,
    load_manifest,
    local_sim_maps,
    make_inputs,
    regenerate_weights,
    tolerance,
)

FULL_MAP_SUM_ATOL = 1e-3  # float64 sums over 61*61*128 values; observed differences <= 1.2e-4


def official_forward(weights: dict, x: torch.Tensor, num_heads: int, adapter_scale: float = 0.2) -> dict:
    """SelaVPR's forward written from the official code's equations (README sections 3.2 and 5).

    ``weights`` are official keys without the ``module.`` prefix. Any grid, registers allowed.
    """
    w = {k.removeprefix("backbone."): v for k, v in weights.items()}
    batch, _, height, width = x.shape
    rows, cols = height // 14, width // 14
    dim = w["cls_token"].shape[-1]
    tokens = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    tokens = torch.cat((w["cls_token"].expand(batch, -1, -1), tokens), dim=1)
    side = math.isqrt(w["pos_embed"].shape[1] - 1)
    grid = w["pos_embed"][:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if (rows, cols) != (side, side):
        grid = F.interpolate(
            grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False
        )
    pos = torch.cat((w["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
    tokens = tokens + pos
    prefix = 1
    if "register_tokens" in w:
        registers = w["register_tokens"]
        tokens = torch.cat((tokens[:, :1], registers.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        prefix += registers.shape[1]

    def norm(t, name):
        return F.layer_norm(t, (dim,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return F.linear(t, w[f"{name}.weight"], w[f"{name}.bias"])

    def adapter(t, name):
        return linear(F.relu(linear(t, f"{name}.D_fc1")), f"{name}.D_fc2")

    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    count = tokens.shape[1]
    for i in range(depth):
        b = f"blocks.{i}"
        y = norm(tokens, f"{b}.norm1")
        q, k, v = (
            linear(y, f"{b}.attn.qkv").reshape(batch, count, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        )
        attention = torch.softmax((q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        a = linear((attention @ v).transpose(1, 2).reshape(batch, count, dim), f"{b}.attn.proj")
        tokens = tokens + w[f"{b}.ls1.gamma"] * (a + adapter(a, f"{b}.adapter1"))
        y = norm(tokens, f"{b}.norm2")
        mlp = linear(F.gelu(linear(y, f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        tokens = tokens + w[f"{b}.ls2.gamma"] * (mlp + adapter_scale * adapter(y, f"{b}.adapter2"))
    patches = norm(tokens, "norm")[:, prefix:]
    pooled = F.normalize(patches, dim=-1).clamp(min=1e-6).pow(3).mean(dim=1).pow(1 / 3)
    fmap = patches.transpose(1, 2).reshape(batch, dim, rows, cols)
    up = F.conv_transpose2d(fmap, w["LocalAdapt.upconv1.weight"], w["LocalAdapt.upconv1.bias"], stride=2, padding=1)
    up = F.conv_transpose2d(
        F.relu(up), w["LocalAdapt.upconv2.weight"], w["LocalAdapt.upconv2.bias"], stride=2, padding=1
    )
    return {
        "global": F.normalize(pooled, dim=-1),
        "local": F.normalize(up.permute(0, 2, 3, 1), dim=-1),
        "patch_tokens": patches,
    }


@pytest.fixture(scope="module")
def manifest():
    return load_manifest("selavpr")


@pytest.fixture(scope="module")
def expected():
    return load_expected("selavpr")


@pytest.fixture(scope="module")
def weights(manifest):
    return regenerate_weights(manifest)


@pytest.fixture(scope="module")
def converted(weights, tmp_path_factory):
    """The official weights written as the released file (DataParallel keys in a training dict), then converted."""
    work = tmp_path_factory.mktemp("selavpr")
    checkpoint = work / "SelaVPR_msls.pth"
    torch.save(
        {"epoch_num": 3, "model_state_dict": {f"module.{k}": v for k, v in weights.items()}, "best_r5": 90.0},
        checkpoint,
    )
    out = work / "selavpr-dinov2"
    assert vprhub_main(["convert", "selavpr", str(checkpoint), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(converted):
    return AutoModel.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def outputs(manifest, model):
    with torch.no_grad():
        return model(make_inputs(manifest)["x224"])


def test_converted_folder_loads_with_auto_classes(manifest, converted, model):
    assert isinstance(model, vprhub.SelaVPRModel)
    config = model.config
    backbone = config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads) == (1024, 2, 16)
    assert (config.adapter_dim, config.parallel_adapter_scale) == (512, 0.2)
    assert (config.local_hidden_dim, config.local_dim, config.descriptor_dim) == (256, 128, 1024)
    assert config.pos_embed_rule == "dinov2_hub"
    assert AutoImageProcessor.from_pretrained(converted).size == {"height": 224, "width": 224}
    numel = {entry["key"]: math.prod(entry["shape"]) for entry in manifest["params"]}
    trainable = sum(n for key, n in numel.items() if ".adapter" in key or not key.startswith("backbone."))
    assert mark_trainable(model) == (trainable, sum(numel.values()))


def test_outputs_match_official(manifest, expected, outputs):
    diffs = {
        "global": assert_close(
            outputs.descriptors,
            expected["x224.global_descriptor"],
            tolerance(manifest, "x224.global_descriptor"),
            "global",
        ),
        "local_sub": assert_close(
            outputs.local_features[:, ::3, ::3],
            expected["x224.local_features_sub"],
            tolerance(manifest, "x224.local_features_sub"),
            "local features",
        ),
        "patch_sub": assert_close(
            outputs.patch_tokens[:, :, ::16],
            expected["x224.patch_tokens_sub"],
            tolerance(manifest, "x224.patch_tokens_sub"),
            "patch tokens",
        ),
    }
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    assert outputs.local_features.shape == (3, 61, 61, 128)
    assert outputs.descriptors.dtype == outputs.local_features.dtype == torch.float32
    for image, check in enumerate(manifest["full_tensor_checks"]["local_features"]):
        full = outputs.local_features[image].double()
        assert full.sum().item() == pytest.approx(check["sum"], abs=FULL_MAP_SUM_ATOL)
        assert full.abs().sum().item() == pytest.approx(check["abs_sum"], abs=FULL_MAP_SUM_ATOL)


def test_local_sim_scores_and_rerank_orders_match_official(manifest, expected, outputs):
    local = outputs.local_features
    r0, r1, r2, e0 = local_sim_maps(manifest)
    margins = manifest["local_sim"]

    order, scores = rerank(local[0], torch.stack([local[0], local[1], local[2], r1, r2, e0]))
    slack = torch.tensor([m["near_ties_below_1e-05"] for m in margins["margins_model"]], dtype=torch.float32)
    assert ((scores - expected["local_sim.scores_model"]).abs() <= slack).all(), scores
    print("model-case scores", scores.tolist(), "official", expected["local_sim.scores_model"].tolist())
    assert torch.equal(order, expected["local_sim.rerank_order_model"])

    order, scores = rerank(r0, torch.stack([r0, r1, r2, e0]))
    assert torch.equal(scores, expected["local_sim.scores_isolated"])
    assert torch.equal(order, expected["local_sim.rerank_order_isolated"])


def test_reference_reproduces_the_fixture(manifest, expected, weights):
    """The independent re-implementation used below agrees with the official outputs."""
    with torch.no_grad():
        ref = official_forward(weights, make_inputs(manifest)["x224"][:1], num_heads=16)
    assert_close(ref["global"], expected["x224.global_descriptor"][:1], 1e-5, "reference global")
    assert_close(ref["local"][:, ::3, ::3], expected["x224.local_features_sub"][:1], 1e-5, "reference local")


def test_non_square_non_224_input_matches_reference(weights, model):
    x = torch.randn(1, 3, 280, 210, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = official_forward(weights, x, num_heads=16)
        out = model(x)
    assert out.local_features.shape == (1, 4 * 20 - 3, 4 * 15 - 3, 128)
    assert_close(out.descriptors, ref["global"], 1e-5, "global 280x210")
    assert_close(out.local_features, ref["local"], 1e-5, "local 280x210")
    assert_close(out.patch_tokens, ref["patch_tokens"], 1e-4, "patch tokens 280x210")
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.randn(1, 3, 224, 220))


def official_state_dict(width: int, depth: int, registers: int, seed: int) -> dict[str, torch.Tensor]:
    """A small SelaVPR state_dict in the official layout, numerically healthy (README section 1 rules)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "cls_token": ([1, 1, width], 0.0, 0.02),
        "pos_embed": ([1, 1 + 37 * 37, width], 0.0, 0.02),
        "mask_token": ([1, width], 0.0, 0.02),
        "patch_embed.proj.weight": ([width, 3, 14, 14], 0.0, (3 * 14 * 14) ** -0.5),
        "patch_embed.proj.bias": ([width], 0.0, 0.02),
    }
    if registers:
        shapes["register_tokens"] = ([1, registers, width], 0.0, 0.02)
    for i in range(depth):
        b = f"blocks.{i}"
        for name, out_dim, in_dim in (
            ("attn.qkv", 3 * width, width),
            ("attn.proj", width, width),
            ("mlp.fc1", 4 * width, width),
            ("mlp.fc2", width, 4 * width),
            ("adapter1.D_fc1", width // 2, width),
            ("adapter1.D_fc2", width, width // 2),
            ("adapter2.D_fc1", width // 2, width),
            ("adapter2.D_fc2", width, width // 2),
        ):
            shapes[f"{b}.{name}.weight"] = ([out_dim, in_dim], 0.0, in_dim**-0.5)
            shapes[f"{b}.{name}.bias"] = ([out_dim], 0.0, 0.02)
        for name in ("norm1", "norm2"):
            shapes[f"{b}.{name}.weight"] = ([width], 1.0, 0.1)
            shapes[f"{b}.{name}.bias"] = ([width], 0.0, 0.02)
        shapes[f"{b}.ls1.gamma"] = shapes[f"{b}.ls2.gamma"] = ([width], 1.0, 0.1)
    shapes["norm.weight"], shapes["norm.bias"] = ([width], 1.0, 0.1), ([width], 0.0, 0.02)
    state = {f"backbone.{k}": torch.randn(s, generator=generator) * std + mean for k, (s, mean, std) in shapes.items()}
    state["aggregation.1.p"] = torch.full((1,), 3.0)
    for name, in_dim, out_dim in (("upconv1", width, 32), ("upconv2", 32, 16)):
        state[f"LocalAdapt.{name}.weight"] = (
            torch.randn(in_dim, out_dim, 3, 3, generator=generator) * (in_dim * 9) ** -0.5
        )
        state[f"LocalAdapt.{name}.bias"] = torch.randn(out_dim, generator=generator) * 0.02
    return state


def test_registers_variant_converts_and_matches_reference():
    state = official_state_dict(width=64, depth=2, registers=4, seed=1)
    model = convert_state_dict("selavpr", {f"module.{k}": v for k, v in state.items()}, num_attention_heads=4)
    backbone = model.config.backbone_config
    assert isinstance(backbone, Dinov2WithRegistersConfig) and backbone.num_register_tokens == 4
    assert (model.config.adapter_dim, model.config.local_hidden_dim, model.config.local_dim) == (32, 32, 16)
    x = torch.randn(2, 3, 182, 238, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = official_forward(state, x, num_heads=4)
        out = model(x)
    assert out.patch_tokens.shape == (2, 13 * 17, 64)  # registers and class token excluded
    assert_close(out.descriptors, ref["global"], 1e-5, "registers global")
    assert_close(out.local_features, ref["local"], 1e-5, "registers local")
    assert_close(out.patch_tokens, ref["patch_tokens"], 1e-4, "registers patch tokens")
    without = {k: v for k, v in state.items() if k != "backbone.register_tokens"}
    plain = convert_state_dict("selavpr", without, num_attention_heads=4)
    with torch.no_grad():
        differs = (plain(x).descriptors - out.descriptors).abs().max().item()
    assert differs > 1e-3  # the registers do take part in attention
