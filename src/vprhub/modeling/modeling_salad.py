"""DINOv2 SALAD as a transformers model: Dinov2 backbone + optimal-transport aggregation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .aggregation import SaladAggregator
from .backbone import build_backbone, num_prefix_tokens, patch_grid, run_backbone, tokens_to_map
from .configuration_salad import SaladConfig


@dataclass
class SaladOutput(ModelOutput):
    """
    descriptors (`torch.FloatTensor` of shape `(batch_size, num_clusters * cluster_dim + token_dim)`):
        L2-normalised global descriptors (float32).
    feature_map (`torch.FloatTensor` of shape `(batch_size, hidden_size, height / 14, width / 14)`):
        Backbone patch tokens as a feature map (the SALAD input `f`).
    token (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Backbone class token (the SALAD input `t`).
    assignment (`torch.FloatTensor` of shape `(batch_size, num_clusters, num_patches)`):
        Sinkhorn transport weights of every patch to every cluster, dustbin excluded.
    aggregation (`torch.FloatTensor` of shape `(batch_size, num_clusters * cluster_dim + token_dim)`):
        The L2-normalised SALAD aggregation before the projection; only for models with a `projection_dim`.
    """

    descriptors: torch.FloatTensor | None = None
    feature_map: torch.FloatTensor | None = None
    token: torch.FloatTensor | None = None
    assignment: torch.FloatTensor | None = None
    aggregation: torch.FloatTensor | None = None


class SaladPreTrainedModel(PreTrainedModel):
    config: SaladConfig
    config_class = SaladConfig
    base_model_prefix = "salad"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Dinov2Layer"]


class SaladModel(SaladPreTrainedModel):
    """DINOv2 backbone (last ``num_trainable_blocks`` trained) followed by SALAD aggregation."""

    def __init__(self, config: SaladConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config, config.pos_embed_rule)
        self.aggregator = SaladAggregator(
            in_channels=config.backbone_config.hidden_size,
            num_clusters=config.num_clusters,
            cluster_dim=config.cluster_dim,
            token_dim=config.token_dim,
            hidden_dim=config.head_hidden_dim,
            dropout=config.dropout,
            dustbin_init=config.dustbin_init,
            sinkhorn_iterations=config.sinkhorn_iterations,
        )
        self.projection = nn.Linear(config.aggregation_dim, config.projection_dim) if config.projection_dim else None
        self.post_init()
        self._freeze_early_blocks()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise as transformers does, then freeze the early blocks again.

        ``from_pretrained`` re-creates loaded parameters as trainable and then calls this
        method, so the freezing of ``__init__`` is restored here.
        """
        super().initialize_weights()
        self._freeze_early_blocks()

    @property
    def num_frozen_layers(self) -> int:
        depth = self.config.backbone_config.num_hidden_layers
        return max(depth - self.config.num_trainable_blocks, 0)

    def _freeze_early_blocks(self) -> None:
        """Embeddings and all but the last ``num_trainable_blocks`` layers get no gradient."""
        if not self.num_frozen_layers:
            return
        self.backbone.embeddings.requires_grad_(False)
        for layer in self.backbone.encoder.layer[: self.num_frozen_layers]:
            layer.requires_grad_(False)

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SaladAggregator):
            torch.nn.init.constant_(module.dust_bin, self.config.dustbin_init)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SaladOutput:
        grid = patch_grid(pixel_values, self.config.backbone_config)
        pixel_values = pixel_values.to(self.backbone.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = run_backbone(self.backbone, pixel_values, self.num_frozen_layers, self.config.final_norm)
        token = hidden[:, 0]
        feature_map = tokens_to_map(hidden[:, num_prefix_tokens(self.config.backbone_config) :], grid)
        descriptors, assignment = self.aggregator(feature_map, token)
        aggregation = None
        if self.projection is not None:
            aggregation = descriptors
            descriptors = nn.functional.normalize(self.projection(aggregation).float(), dim=-1)
        return SaladOutput(
            descriptors=descriptors, feature_map=feature_map, token=token, assignment=assignment, aggregation=aggregation
        )


__all__ = ["SaladModel", "SaladOutput", "SaladPreTrainedModel"]
