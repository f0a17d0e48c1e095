"""Configuration of DINOv2 SALAD (Izquierdo & Civera, CVPR 2024)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import CONFIG_AUTO_CLASS, VPR_CONFIG_VERSION, SubConfigSpec, VPRConfig, check_common_fields


@strict
class SaladConfig(VPRConfig):
    r"""
    backbone_config (`Dinov2Config`): the DINOv2 ViT (defaults to ViT-B/14 at 518 px, as `facebook/dinov2-base`).
    pos_embed_rule (`str`, defaults to `"dinov2_hub"`): position-embedding interpolation, `"dinov2_hub"`
        (scale factor (grid + 0.1) / 37, as DINOv2's own code and every official VPR model) or
        `"transformers"` (output-size rule of transformers' Dinov2).
    num_trainable_blocks (`int`, defaults to 4): the last blocks trained; earlier ones run without autograd.
    final_norm (`bool`, defaults to `True`): apply the backbone's final LayerNorm.
    num_clusters (`int`, defaults to 64): number of clusters m.
    cluster_dim (`int`, defaults to 128): channels l of each cluster feature.
    token_dim (`int`, defaults to 256): dimension g of the global scene token.
    head_hidden_dim (`int`, defaults to 512): hidden width of the three SALAD MLP heads.
    dropout (`float`, defaults to 0.3): dropout inside the cluster-feature and score heads.
    dustbin_init (`float`, defaults to 1.0): initial value of the learned dustbin score.
    sinkhorn_iterations (`int`, defaults to 3): log-space Sinkhorn iterations.
    projection_dim (`int`, *optional*): width of a learned linear projection (with bias) of the aggregation,
        followed by L2 normalisation, as MegaLoc has; `None` (the default) keeps the SALAD descriptor.
    image_size (`list[int]`, defaults to `[322, 322]`): evaluation resolution (height, width).
    vprhub_version (`int`): version of the vprhub config format that wrote this config.
    """

    model_type = "salad"
    _auto_class = CONFIG_AUTO_CLASS
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="dinov2", init_kwargs={"image_size": 518}
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_rule: str = "dinov2_hub"
    num_trainable_blocks: int = 4
    final_norm: bool = True
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    head_hidden_dim: int = 512
    dropout: float | int = 0.3
    dustbin_init: float | int = 1.0
    sinkhorn_iterations: int = 3
    projection_dim: int | None = None
    image_size: list[int] | tuple[int, int] = (322, 322)
    vprhub_version: int = VPR_CONFIG_VERSION

    @property
    def aggregation_dim(self) -> int:
        """Width of the SALAD aggregation, m * l + g."""
        return self.num_clusters * self.cluster_dim + self.token_dim

    @property
    def descriptor_dim(self) -> int:
        """Width of the global descriptor: the projection's, else the aggregation's."""
        return self.projection_dim or self.aggregation_dim

    def validate_architecture(self):
        """Part of `@strict` validation: reject impossible settings early."""
        check_common_fields(self)
        if not 0 <= self.num_trainable_blocks:
            raise ValueError(f"num_trainable_blocks must be >= 0, got {self.num_trainable_blocks}")
        for field in ("num_clusters", "cluster_dim", "token_dim", "head_hidden_dim", "sinkhorn_iterations"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim}")


__all__ = ["SaladConfig"]
