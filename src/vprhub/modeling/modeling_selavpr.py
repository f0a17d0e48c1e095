"""SelaVPR as a transformers model: frozen Dinov2 with serial and parallel adapters, GeM global
descriptor and dense local features for mutual-nearest-neighbour re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .adapters import count_parameters, freeze_all_but_adapters, inject_adapters
from .aggregation import GeM
from .backbone import build_backbone, num_prefix_tokens, patch_grid, run_backbone, tokens_to_map
from .configuration_selavpr import SelaVPRConfig

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
    """

    descriptors: torch.FloatTensor | None = None
    local_features: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None


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


class SelaVPRPreTrainedModel(PreTrainedModel):
    config: SelaVPRConfig
    config_class = SelaVPRConfig
    base_model_prefix = "selavpr"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Dinov2Layer", "Dinov2WithRegistersLayer"]


class SelaVPRModel(SelaVPRPreTrainedModel):
    """Dinov2 (frozen) + SelaVPR adapters in every layer, GeM global head and local up-convolution head.

    Each layer computes ``x + ls1(serial(attn(norm1(x))))`` then
    ``x + ls2(mlp(norm2(x)) + s * parallel(norm2(x)))``. Only the adapters, GeM's ``p`` and the
    local head are trainable; :meth:`parameter_counts` reports how many parameters that is.

    Initialisation of a new model: the adapters' up-projections start at zero (as the official
    training script sets them), so a fresh SelaVPR backbone computes exactly the plain Dinov2
    tokens; down-projections follow Dinov2's initialisation (truncated normal, std
    ``initializer_range``).
    """

    def __init__(self, config: SelaVPRConfig) -> None:
        super().__init__(config)
        backbone_config = config.backbone_config
        width, bottleneck = backbone_config.hidden_size, config.adapter_dim
        self.backbone = build_backbone(backbone_config, config.pos_embed_rule)
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
        self._zero_adapter_up_projections()
        self.freeze_backbone()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, then :meth:`freeze_backbone` again (loading makes every
        parameter trainable)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_backbone()
        return loaded

    def freeze_backbone(self) -> None:
        """Freeze Dinov2's own weights; adapters, GeM and the local head stay trainable."""
        freeze_all_but_adapters(self.backbone)

    def adapter_modules(self) -> list[SelaVPRAdapter]:
        """All injected adapters, serial and parallel, layer by layer."""
        return [module for module in self.backbone.modules() if isinstance(module, SelaVPRAdapter)]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        return count_parameters(self)

    @torch.no_grad()
    def _zero_adapter_up_projections(self) -> None:
        """Start every adapter at a zero output (the backbone's init reached them inside ``post_init``)."""
        for adapter in self.adapter_modules():
            nn.init.zeros_(adapter.up_proj.weight)
            nn.init.zeros_(adapter.up_proj.bias)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GeM):
            init.constant_(module.p, self.config.gem_p)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SelaVPROutput:
        backbone_config = self.config.backbone_config
        grid = patch_grid(pixel_values, backbone_config)
        pixel_values = pixel_values.to(self.backbone.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = run_backbone(self.backbone, pixel_values)
        patch_tokens = hidden[:, num_prefix_tokens(backbone_config) :]
        pooled = self.gem(nn.functional.normalize(patch_tokens, dim=-1), dims=(1,))
        descriptors = nn.functional.normalize(pooled, dim=-1)
        local_features = self.local_head(tokens_to_map(patch_tokens, grid))
        return SelaVPROutput(
            descriptors=descriptors.float(), local_features=local_features.float(), patch_tokens=patch_tokens
        )


__all__ = ["SelaVPRAdapter", "SelaVPRModel", "SelaVPROutput", "SelaVPRPreTrainedModel"]
