"""Configuration of CricaVPR (Lu et al., CVPR 2024)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import CONFIG_AUTO_CLASS, VPR_CONFIG_VERSION, SubConfigSpec, VPRConfig, check_common_fields

BATCH_MODES = ("batch", "independent")


@strict
class CricaVPRConfig(VPRConfig):
    r"""
    backbone_config (`Dinov2Config` or `Dinov2WithRegistersConfig`): the DINOv2 ViT (defaults to ViT-B/14 at
        518 px, as `facebook/dinov2-base`); register tokens, if any, are treated like the class token.
    pos_embed_rule (`str`, defaults to `"dinov2_hub"`): position-embedding interpolation, `"dinov2_hub"`
        (scale factor (grid + 0.1) / 37, as the official CricaVPR code) or `"transformers"` (output-size rule).
    adapter_ratio (`float`, defaults to 0.5): bottleneck width of the MulConv adapters as a fraction of the hidden size.
    adapter_scale (`float`, defaults to 0.2): factor s on the adapter output added beside each MLP.
    adapter_branch_fractions (`list[float]`, defaults to `[0.5, 0.25, 0.25]`): output widths of the 1x1, 3x3
        and 5x5 branches as fractions of the bottleneck; they must add up to the bottleneck.
    adapter_reduce_fractions (`list[float]`, defaults to `[0.0625, 0.0625]`): widths of the 1x1 reductions
        before the 3x3 and the 5x5 convolutions, as fractions of the bottleneck.
    adapter_bn_eps (`float`, defaults to 1e-3): epsilon of the adapters' batch norms.
    grid_splits (`list[int]`, defaults to `[2, 3]`): the patch grid is cut into k x k cells for each k; each
        cell gives one GeM vector.
    gem_p (`float`, defaults to 3.0): initial GeM exponent (learnable, shared by all cells).
    gem_eps (`float`, defaults to 1e-6): GeM clamp minimum.
    batch_mode (`str`, defaults to `"batch"`): `"batch"` runs the cross-image encoder across the images of
        the forward batch (official: a descriptor depends on its batch); `"independent"` encodes every image
        on its own.
    encoder_num_layers (`int`, defaults to 2): layers of the cross-image transformer encoder.
    encoder_num_heads (`int`, defaults to 16): attention heads of the cross-image encoder.
    encoder_ffn_dim (`int`, defaults to 2048): feed-forward width of the cross-image encoder.
    encoder_dropout (`float`, defaults to 0.1): dropout inside the cross-image encoder.
    encoder_layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon of the cross-image encoder.
    image_size (`list[int]`, defaults to `[224, 224]`): evaluation resolution (height, width).
    vprhub_version (`int`): version of the vprhub config format that wrote this config.
    """

    model_type = "cricavpr"
    _auto_class = CONFIG_AUTO_CLASS
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="dinov2", init_kwargs={"image_size": 518}
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_rule: str = "dinov2_hub"
    adapter_ratio: float | int = 0.5
    adapter_scale: float | int = 0.2
    adapter_branch_fractions: list[float | int] | tuple[float | int, ...] = (0.5, 0.25, 0.25)
    adapter_reduce_fractions: list[float | int] | tuple[float | int, ...] = (0.0625, 0.0625)
    adapter_bn_eps: float = 1e-3
    grid_splits: list[int] | tuple[int, ...] = (2, 3)
    gem_p: float | int = 3.0
    gem_eps: float = 1e-6
    batch_mode: str = "batch"
    encoder_num_layers: int = 2
    encoder_num_heads: int = 16
    encoder_ffn_dim: int = 2048
    encoder_dropout: float | int = 0.1
    encoder_layer_norm_eps: float = 1e-5
    image_size: list[int] | tuple[int, int] = (224, 224)
    vprhub_version: int = VPR_CONFIG_VERSION

    @property
    def num_tokens(self) -> int:
        """Tokens per image entering the cross-image encoder: class token + one per grid cell."""
        return 1 + sum(k * k for k in self.grid_splits)

    @property
    def descriptor_dim(self) -> int:
        """Width of the global descriptor: ``num_tokens * hidden_size`` (14 x 768 for the official model)."""
        return self.num_tokens * self.backbone_config.hidden_size

    @property
    def adapter_dim(self) -> int:
        """Bottleneck width of the MulConv adapters."""
        return round(self.backbone_config.hidden_size * self.adapter_ratio)

    @property
    def adapter_channels(self) -> dict[str, int]:
        """Channel widths of the adapter branches, derived from the bottleneck in one place."""
        bottleneck = self.adapter_dim
        out1, out3, out5 = (round(bottleneck * f) for f in self.adapter_branch_fractions)
        reduce3, reduce5 = (round(bottleneck * f) for f in self.adapter_reduce_fractions)
        return dict(branch1x1=out1, reduce3x3=reduce3, branch3x3=out3, reduce5x5=reduce5, branch5x5=out5)

    def validate_architecture(self):
        """Part of `@strict` validation: reject impossible settings early."""
        check_common_fields(self)
        if self.backbone_config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"backbone_config must be a Dinov2 config, got model_type {self.backbone_config.model_type!r}"
            )
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {self.batch_mode!r}")
        if len(self.adapter_branch_fractions) != 3 or len(self.adapter_reduce_fractions) != 2:
            raise ValueError(
                "adapter_branch_fractions needs 3 values (1x1, 3x3, 5x5) and adapter_reduce_fractions 2 (3x3, 5x5), "
                f"got {list(self.adapter_branch_fractions)} and {list(self.adapter_reduce_fractions)}"
            )
        channels = self.adapter_channels
        if min(channels.values()) < 1 or self.adapter_dim < 1:
            raise ValueError(f"adapter widths must be >= 1, got bottleneck {self.adapter_dim} and {channels}")
        branches = channels["branch1x1"] + channels["branch3x3"] + channels["branch5x5"]
        if branches != self.adapter_dim:
            raise ValueError(
                f"adapter branches must add up to the bottleneck {self.adapter_dim}, got {branches} "
                f"from adapter_branch_fractions {list(self.adapter_branch_fractions)}"
            )
        if not self.grid_splits or min(self.grid_splits) < 1:
            raise ValueError(f"grid_splits must be positive integers, got {list(self.grid_splits)}")
        hidden = self.backbone_config.hidden_size
        if self.encoder_num_heads < 1 or hidden % self.encoder_num_heads:
            raise ValueError(f"encoder_num_heads must divide the hidden size {hidden}, got {self.encoder_num_heads}")
        for field in ("encoder_num_layers", "encoder_ffn_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.gem_p <= 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")


__all__ = ["BATCH_MODES", "CricaVPRConfig"]
