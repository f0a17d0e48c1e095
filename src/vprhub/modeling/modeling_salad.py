"""DINOv2 SALAD as a transformers model: Dinov2 backbone + optimal-transport aggregation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from .aggregation import SaladAggregator
from .backbone import build_backbone, num_prefix_tokens, patch_grid, run_backbone, tokens_to_map
from .configuration_salad import SaladConfig
from .pretrained import VPRPreTrainedModel


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
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        Backbone hidden states: the embeddings' output, then each layer's, `(batch_size, tokens, hidden_size)`.
    """

    descriptors: torch.FloatTensor | None = None
    feature_map: torch.FloatTensor | None = None
    token: torch.FloatTensor | None = None
    assignment: torch.FloatTensor | None = None
    aggregation: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SaladPreTrainedModel(VPRPreTrainedModel):
    config: SaladConfig
    config_class = SaladConfig
    base_model_prefix = "salad"
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SaladAggregator):
            init.constant_(module.dust_bin, self.config.dustbin_init)


class SaladModel(SaladPreTrainedModel):
    """DINOv2 backbone (last ``num_trainable_blocks`` trained) followed by SALAD aggregation."""

    def __init__(self, config: SaladConfig) -> None:
        super().__init__(config)
        self.backbone = self._adopt_backbone(build_backbone(config.backbone_config, config.pos_embed_rule))
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

    @property
    def num_frozen_layers(self) -> int:
        """Backbone layers before the last ``num_trainable_blocks``: they run without autograd."""
        depth = self.config.backbone_config.num_hidden_layers
        return max(depth - self.config.num_trainable_blocks, 0)

    def trainable_modules(self) -> list[nn.Module]:
        """The last ``num_trainable_blocks`` layers (and the embeddings when that is every layer), the
        final norm (when used), the aggregator and the projection (when there is one)."""
        layers = list(self.backbone.encoder.layer[self.num_frozen_layers :])
        embeddings = [] if self.num_frozen_layers else [self.backbone.embeddings]
        norm = [self.backbone.layernorm] if self.config.final_norm else []
        projection = [self.projection] if self.projection is not None else []
        return [*embeddings, *layers, *norm, self.aggregator, *projection]

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None) -> SaladOutput:
        """``pixel_values`` ``[B, 3, H, W]``, H and W multiples of the patch size, finite values."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        grid = patch_grid(pixel_values, self.config.backbone_config)
        hidden, hidden_states = run_backbone(
            self.backbone, pixel_values, self.num_frozen_layers, self.config.final_norm, output_hidden_states
        )
        token = hidden[:, 0]
        feature_map = tokens_to_map(hidden[:, num_prefix_tokens(self.config.backbone_config) :], grid)
        descriptors, assignment = self.aggregator(feature_map, token)
        aggregation = None
        if self.projection is not None:
            aggregation = descriptors
            projected = self.projection(aggregation.to(self.projection.weight.dtype))  # aggregation is float32
            descriptors = nn.functional.normalize(projected.float(), dim=-1)
        return SaladOutput(
            descriptors=descriptors,
            feature_map=feature_map,
            token=token,
            assignment=assignment,
            aggregation=aggregation,
            hidden_states=hidden_states,
        )


__all__ = ["SaladModel", "SaladOutput", "SaladPreTrainedModel"]
