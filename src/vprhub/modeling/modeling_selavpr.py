"""SelaVPR as a transformers model: frozen Dinov2 with serial and parallel adapters, GeM global
descriptor and dense local features for mutual-nearest-neighbour re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from .adapters import adapter_modules, inject_adapters
from .aggregation import GeM
from .backbone import build_backbone, num_prefix_tokens, patch_grid, run_backbone, tokens_to_map
from .configuration_selavpr import SelaVPRConfig
from .pretrained import VPRPreTrainedModel

SERIAL_ADAPTER = "serial"
PARALLEL_ADAPTER = "parallel"


@dataclass
class SelaVPROutput(ModelOutput):
    """
    descriptors (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        L2-normalised global descriptors (float32): GeM over the L2-normalised patch tokens.
    local_features (`torch.FloatTensor` of shape `(batch_size, height', width', local_dim)`):
        Dense local features, channels last, L2-normalised per location (float32). A patch grid
        of ``h x w`` gives ``(4h - 3) x (4w - 3)`` locations (61 x 61 at 224 x 224).
    patch_tokens (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
        Final-norm backbone patch tokens, row-major, class and register tokens excluded.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        Backbone hidden states: the embeddings' output, then each layer's, `(batch_size, tokens, hidden_size)`.
    """

    descriptors: torch.FloatTensor | None = None
    local_features: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SelaVPRAdapter(nn.Module):
    """Bottleneck adapter ``up(ReLU(down(x)))``; with ``skip`` it returns ``x + up(...)`` (serial adapter)."""

    def __init__(self, hidden_size: int, bottleneck: int, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.down_proj = nn.Linear(hidden_size, bottleneck)
        self.act = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up_proj(self.act(self.down_proj(x)))
        return x + delta if self.skip else delta

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class SelaVPRLocalHead(nn.Module):
    """Local adaptation: two 3x3 stride-2 transposed convolutions (ReLU between), L2 norm per location."""

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.upconv2 = nn.ConvTranspose2d(hidden_dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` -> ``[B, 4h - 3, 4w - 3, out_dim]`` (channels last)."""
        local = self.upconv2(self.act(self.upconv1(feature_map)))
        return nn.functional.normalize(local.permute(0, 2, 3, 1), dim=-1)


class SelaVPRPreTrainedModel(VPRPreTrainedModel):
    config: SelaVPRConfig
    config_class = SelaVPRConfig
    base_model_prefix = "selavpr"
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GeM):
            init.constant_(module.p, self.config.gem_p)

    def _init_adapter(self, adapter: nn.Module, module: nn.Module) -> None:
        """Up-projections start at zero (as the official training script sets them), so a new adapter
        leaves the Dinov2 tokens unchanged; down-projections keep Dinov2's rule."""
        if isinstance(adapter, SelaVPRAdapter) and module is adapter.up_proj:
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class SelaVPRModel(SelaVPRPreTrainedModel):
    """Dinov2 + SelaVPR adapters in every layer, GeM global head and local up-convolution head.

    Each layer computes ``x + ls1(serial(attn(norm1(x))))`` then
    ``x + ls2(mlp(norm2(x)) + s * parallel(norm2(x)))``. Training (:func:`mark_trainable`) updates
    the adapters, GeM's ``p`` and the local head; Dinov2's own weights stay frozen.

    New adapters start with zero up-projections, i.e. as the plain Dinov2 backbone (see
    :meth:`_init_adapter`).
    """

    def __init__(self, config: SelaVPRConfig) -> None:
        super().__init__(config)
        backbone_config = config.backbone_config
        width, bottleneck = backbone_config.hidden_size, config.adapter_dim
        self.backbone = self._adopt_backbone(build_backbone(backbone_config, config.pos_embed_rule))
        inject_adapters(self.backbone, SERIAL_ADAPTER, "attention", lambda _: SelaVPRAdapter(width, bottleneck, skip=True))
        inject_adapters(
            self.backbone,
            PARALLEL_ADAPTER,
            "mlp",
            lambda _: SelaVPRAdapter(width, bottleneck, skip=False),
            scale=config.parallel_adapter_scale,
        )
        self.gem = GeM(config.gem_p, config.gem_eps)
        self.local_head = SelaVPRLocalHead(width, config.local_hidden_dim, config.local_dim)
        self.post_init()

    def adapter_modules(self) -> list[SelaVPRAdapter]:
        """All injected adapters, serial and parallel, layer by layer."""
        return adapter_modules(self.backbone)

    def trainable_modules(self) -> list[nn.Module]:
        """The adapters, GeM and the local head."""
        return [*self.adapter_modules(), self.gem, self.local_head]

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None) -> SelaVPROutput:
        """``pixel_values`` ``[B, 3, H, W]``, H and W multiples of the patch size, finite values."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        backbone_config = self.config.backbone_config
        grid = patch_grid(pixel_values, backbone_config)
        hidden, hidden_states = run_backbone(self.backbone, pixel_values, output_hidden_states=output_hidden_states)
        patch_tokens = hidden[:, num_prefix_tokens(backbone_config) :]
        pooled = self.gem(nn.functional.normalize(patch_tokens, dim=-1), dims=(1,))
        descriptors = nn.functional.normalize(pooled.float(), dim=-1)  # unit length in float32 for any dtype
        local_features = self.local_head(tokens_to_map(patch_tokens, grid))
        return SelaVPROutput(
            descriptors=descriptors,
            local_features=local_features.float(),
            patch_tokens=patch_tokens,
            hidden_states=hidden_states,
        )


__all__ = ["SelaVPRAdapter", "SelaVPRModel", "SelaVPROutput", "SelaVPRPreTrainedModel"]
