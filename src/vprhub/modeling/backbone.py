"""DINOv2 backbone plumbing shared by the three models.

The backbone is transformers' own ``Dinov2Model`` (or ``Dinov2WithRegistersModel``); this
module only chooses its position-embedding interpolation rule, checks inputs, runs the layers
(optionally freezing the first ones) and reshapes patch tokens into a feature map.
"""

from __future__ import annotations

import math
import torch
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
)

from .adapters import adapter_parameter_names
from .configuration_common import POS_EMBED_RULES

DINOV2_HUB_OFFSET = 0.1
BackboneConfig = Dinov2Config | Dinov2WithRegistersConfig


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    """A small random-initialisable Dinov2 for CPU tests, demos and experiments."""
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=224,
        patch_size=14,
    )
    values.update(overrides)
    return Dinov2Config(**values)


def interpolate_pos_embed_hub(
    position_embeddings: torch.Tensor, grid_height: int, grid_width: int, offset: float = DINOV2_HUB_OFFSET
) -> torch.Tensor:
    """Resize ``[1, 1 + S*S, D]`` position embeddings to a ``grid_height x grid_width`` grid.

    The DINOv2-hub rule: bicubic, no antialias, driven by the scale factor
    ``(grid + offset) / S`` rather than by the output size, class embedding untouched.
    """
    num_positions = position_embeddings.shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"position embeddings must form a square grid, got {num_positions} positions")
    if grid_height == side and grid_width == side:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    patch = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = nn.functional.interpolate(
        patch.float(),
        scale_factor=((grid_height + offset) / side, (grid_width + offset) / side),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    if resized.shape[-2:] != (grid_height, grid_width):
        raise RuntimeError(f"interpolated grid {tuple(resized.shape[-2:])} != {(grid_height, grid_width)}")
    resized = resized.to(position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((position_embeddings[:, :1], resized), dim=1)


class _HubRuleMixin:
    """Replaces transformers' output-size interpolation by the DINOv2-hub scale-factor rule."""

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patch_height, patch_width = self.patch_embeddings.patch_size
        return interpolate_pos_embed_hub(self.position_embeddings, height // patch_height, width // patch_width)


class HubRuleDinov2Embeddings(_HubRuleMixin, Dinov2Embeddings):
    """``Dinov2Embeddings`` with the DINOv2-hub position-embedding rule (same parameters)."""


class HubRuleDinov2WithRegistersEmbeddings(_HubRuleMixin, Dinov2WithRegistersEmbeddings):
    """``Dinov2WithRegistersEmbeddings`` with the DINOv2-hub position-embedding rule."""


def build_backbone(config: BackboneConfig, pos_embed_rule: str) -> Dinov2Model | Dinov2WithRegistersModel:
    """A randomly initialised transformers Dinov2 whose embeddings follow ``pos_embed_rule``."""
    if pos_embed_rule not in POS_EMBED_RULES:
        raise ValueError(f"pos_embed_rule must be one of {POS_EMBED_RULES}, got {pos_embed_rule!r}")
    if isinstance(config, Dinov2WithRegistersConfig):
        backbone, hub_embeddings = Dinov2WithRegistersModel(config), HubRuleDinov2WithRegistersEmbeddings
    elif isinstance(config, Dinov2Config):
        backbone, hub_embeddings = Dinov2Model(config), HubRuleDinov2Embeddings
    else:
        raise TypeError(f"backbone_config must be a Dinov2Config or Dinov2WithRegistersConfig, got {type(config)}")
    if pos_embed_rule == "dinov2_hub":
        backbone.embeddings = hub_embeddings(config)
    return backbone


def num_prefix_tokens(config: BackboneConfig) -> int:
    """Class token plus register tokens that precede the patch tokens."""
    return 1 + getattr(config, "num_register_tokens", 0)


def patch_grid(pixel_values: torch.Tensor, config: BackboneConfig) -> tuple[int, int]:
    """Validate ``pixel_values`` ``[B, C, H, W]`` and return the patch grid ``(H / p, W / p)``.

    An empty batch and NaN or infinite values are refused: one bad image would otherwise poison
    the descriptors of the whole batch in models that mix images (CricaVPR). The value check is
    skipped while ``torch.export``/``torch.compile`` trace the model.
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}")
    batch, channels, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError("pixel_values is an empty batch: pass at least one image")
    if channels != config.num_channels:
        raise ValueError(f"pixel_values must have {config.num_channels} channels, got {channels}")
    patch = config.patch_size
    if height % patch or width % patch:
        raise ValueError(f"image height and width must be multiples of {patch}, got {height}x{width}")
    if not torch.compiler.is_compiling() and not _all_finite(pixel_values):
        bad = (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"pixel_values holds NaN or infinite values (images {bad} of the batch)")
    return height // patch, width // patch


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, from one float32 sum (a NaN or an infinity makes it
    non-finite); only a non-finite sum (possibly an overflow) pays for the exact check."""
    return bool(torch.isfinite(values.sum(dtype=torch.float32))) or bool(torch.isfinite(values).all())


def run_backbone(
    backbone: Dinov2Model | Dinov2WithRegistersModel,
    pixel_values: torch.Tensor,
    num_frozen_layers: int = 0,
    final_norm: bool = True,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the Dinov2 embeddings and layers on validated ``pixel_values`` (see :func:`patch_grid`).

    Returns all tokens ``[B, prefix + h*w, D]`` and, with ``output_hidden_states``, the hidden
    states as transformers' Dinov2 gives them: the embeddings' output, then every layer's output
    (before the final norm). The first ``num_frozen_layers`` layers run without autograd (their
    output is detached), as SALAD trains only the last blocks.
    """
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.projection.weight.dtype)
    layers = backbone.encoder.layer
    states = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and not num_frozen_layers):
        hidden = backbone.embeddings(pixel_values)
        states.append(hidden)
        for layer in layers[:num_frozen_layers]:
            hidden = layer(hidden)
            states.append(hidden)
    if num_frozen_layers:
        hidden = hidden.detach()
    for layer in layers[num_frozen_layers:]:
        hidden = layer(hidden)
        states.append(hidden)
    hidden = backbone.layernorm(hidden) if final_norm else hidden
    return hidden, tuple(states) if output_hidden_states else None


def tokens_to_map(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, h*w, D]`` (row-major) to a feature map ``[B, D, h, w]``."""
    batch, count, dim = patch_tokens.shape
    if count != grid[0] * grid[1]:
        raise ValueError(f"{count} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return patch_tokens.transpose(1, 2).reshape(batch, dim, *grid)


def load_backbone_weights(backbone: nn.Module, name_or_path: str, **hub_kwargs) -> None:
    """Copy the weights of a pretrained Dinov2 checkpoint (hub id or folder) into ``backbone``."""
    source_cls = type(backbone)
    pretrained = source_cls.from_pretrained(name_or_path, **hub_kwargs)
    missing, unexpected = backbone.load_state_dict(pretrained.state_dict(), strict=False)
    missing = sorted(set(missing) - adapter_parameter_names(backbone))  # adapters are ours, not Dinov2's
    if missing or unexpected:
        raise ValueError(
            f"Dinov2 checkpoint {name_or_path!r} does not match the backbone: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
