"""Configuration of SelaVPR (Lu et al., ICLR 2024)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import CONFIG_AUTO_CLASS, VPR_CONFIG_VERSION, SubConfigSpec, VPRConfig, check_common_fields


@strict
class SelaVPRConfig(VPRConfig):
    r"""
    backbone_config (`Dinov2Config` or `Dinov2WithRegistersConfig`): the DINOv2 ViT (defaults to ViT-L/14 at
        518 px, as `facebook/dinov2-large`); register tokens, if any, are excluded from the patch tokens.
    pos_embed_rule (`str`, defaults to `"dinov2_hub"`): position-embedding interpolation, `"dinov2_hub"`
        (scale factor (grid + 0.1) / 37, as the official SelaVPR code) or `"transformers"` (output-size rule).
    adapter_ratio (`float`, defaults to 0.5): bottleneck width of both adapters as a fraction of the hidden size.
    parallel_adapter_scale (`float`, defaults to 0.2): factor s on the parallel (MLP-side) adapter output.
    local_hidden_dim (`int`, defaults to 256): channels after the first transposed convolution.
    local_dim (`int`, defaults to 128): channels C of the dense local features.
    gem_p (`float`, defaults to 3.0): initial GeM exponent (learnable).
    gem_eps (`float`, defaults to 1e-6): GeM clamp minimum.
    image_size (`list[int]`, defaults to `[224, 224]`): evaluation resolution (height, width).
    vprhub_version (`int`): version of the vprhub config format that wrote this config.
    """

    model_type = "selavpr"
    _auto_class = CONFIG_AUTO_CLASS
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="dinov2",
            init_kwargs={"image_size": 518, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_rule: str = "dinov2_hub"
    adapter_ratio: float | int = 0.5
    parallel_adapter_scale: float | int = 0.2
    local_hidden_dim: int = 256
    local_dim: int = 128
    gem_p: float | int = 3.0
    gem_eps: float = 1e-6
    image_size: list[int] | tuple[int, int] = (224, 224)
    vprhub_version: int = VPR_CONFIG_VERSION

    @property
    def descriptor_dim(self) -> int:
        """Width of the global descriptor: the backbone hidden size."""
        return self.backbone_config.hidden_size

    @property
    def adapter_dim(self) -> int:
        """Bottleneck width of the adapters, ``int(hidden_size * adapter_ratio)`` as the official code."""
        return int(self.backbone_config.hidden_size * self.adapter_ratio)

    def validate_architecture(self):
        """Part of `@strict` validation: reject impossible settings early."""
        check_common_fields(self)
        if self.backbone_config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"backbone_config must be a Dinov2 config, got model_type {self.backbone_config.model_type!r}")
        if self.adapter_ratio <= 0:
            raise ValueError(f"adapter_ratio must be > 0, got {self.adapter_ratio}")
        if self.adapter_dim < 1:
            raise ValueError(
                f"adapter_ratio {self.adapter_ratio} gives no bottleneck channel for hidden size "
                f"{self.backbone_config.hidden_size}"
            )
        for field in ("local_hidden_dim", "local_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.gem_p <= 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")


__all__ = ["SelaVPRConfig"]
