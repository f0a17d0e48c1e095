"""Official DINOv2 ViT keys (facebookresearch/dinov2 layout) -> transformers Dinov2."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import Dinov2Config, Dinov2WithRegistersConfig

# Official head counts by width; the number of heads cannot be read from tensor shapes.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}

_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls2.gamma": "layer_scale2.lambda1",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def dinov2_config_from_state_dict(
    vit: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> Dinov2Config | Dinov2WithRegistersConfig:
    """Infer width, depth, patch size, grid, MLP ratio and registers from official ViT tensors."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in vit:
            raise ValueError(f"not a DINOv2 ViT state_dict: key {key!r} is missing")
    width = vit["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in vit if (m := _BLOCK_KEY.match(k)))
    patch = vit["patch_embed.proj.weight"].shape[-1]
    side = round((vit["pos_embed"].shape[1] - 1) ** 0.5)
    mlp_hidden = vit["blocks.0.mlp.fc1.weight"].shape[0]
    if mlp_hidden % width:
        raise ValueError(f"MLP width {mlp_hidden} is not a multiple of the embedding width {width}")
    heads = num_attention_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ValueError(f"cannot guess the number of heads for width {width}: pass num_attention_heads")
    values = dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=mlp_hidden // width,
        image_size=side * patch,
        patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in vit,
        layer_norm_eps=1e-6,
    )
    if "register_tokens" in vit:
        return Dinov2WithRegistersConfig(num_register_tokens=vit["register_tokens"].shape[1], **values)
    # MegaLoc's released ViT has no mask token (unused at inference); transformers then omits it too.
    return Dinov2Config(use_mask_token="mask_token" in vit, **values)


def convert_dinov2_keys(
    vit: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rename official ViT keys to transformers names; split fused qkv.

    Returns ``(converted, leftovers)``: ``leftovers`` are the keys this function does not
    know (e.g. adapters inside blocks), for the model-specific converter to map.
    """
    converted, leftovers = {}, {}
    for key, tensor in vit.items():
        if key in _TOP_LEVEL:
            converted[_TOP_LEVEL[key]] = tensor
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            leftovers[key] = tensor
            continue
        index, rest = match.groups()
        prefix = f"encoder.layer.{index}"
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}.attention.{name}.{kind}"] = part.clone()
            continue
        module, _, kind = rest.rpartition(".")
        if rest in _BLOCK:
            converted[f"{prefix}.{_BLOCK[rest]}"] = tensor
        elif module in _BLOCK:
            converted[f"{prefix}.{_BLOCK[module]}.{kind}"] = tensor
        else:
            leftovers[key] = tensor
    return converted, leftovers
