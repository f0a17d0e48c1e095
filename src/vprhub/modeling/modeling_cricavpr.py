"""CricaVPR as a transformers model: frozen Dinov2 with MulConv adapters, regional GeM tokens and a
cross-image transformer encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple, logging

from .adapters import adapter_modules, inject_adapters
from .backbone import build_backbone, num_prefix_tokens, patch_grid, run_backbone, tokens_to_map
from .configuration_cricavpr import BATCH_MODES, CricaVPRConfig
from .grid_pooling import GridGeM, check_grid
from .pretrained import VPRPreTrainedModel

logger = logging.get_logger(__name__)

ADAPTER_NAME = "mulconv"
# Initial value of every weight and bias of the MulConv convolutions (official training script).
MULCONV_INIT = 1e-5


class PatchGridTracker:
    """Forward pre-hook on the backbone embeddings: remembers the patch grid of the images entering it.

    The adapters sit inside Dinov2 layers and only see tokens; they read the grid from here, so it
    is always the grid of the latest images, square or not, whoever calls the backbone. (One model
    object running images of different sizes in several threads at once would share this state.)
    """

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.grid: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixel_values = args[0] if args else kwargs["pixel_values"]
        height, width = pixel_values.shape[-2:]
        self.grid = (height // self.patch_size, width // self.patch_size)


class ConvNormReLU(nn.Module):
    """Conv2d (with bias, 'same' padding) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.norm(self.conv(feature_map)))


class MulConvAdapter(nn.Module):
    """CricaVPR's multi-scale convolution adapter, applied to the second norm's output of a Dinov2 layer.

    ``x0 = ReLU(down_proj(y))``; the patch tokens of ``x0``, as a map on the patch grid, go through an
    Inception-style block (1x1 | 1x1 -> 3x3 | 1x1 -> 5x5, each conv followed by batch norm and ReLU)
    whose concatenated output has the bottleneck width; the prefix (class and register) tokens skip
    it. Then ``x0`` is added to every token and ``up_proj`` maps back. As in the official code the
    prefix rows already hold ``x0``, so they enter ``up_proj`` as ``2 * x0``.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        channels: dict[str, int],
        bn_eps: float,
        num_prefix_tokens: int,
        grid_tracker: PatchGridTracker,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_tracker = grid_tracker
        self.down_proj = nn.Linear(hidden_size, bottleneck)
        self.branch1x1 = ConvNormReLU(bottleneck, channels["branch1x1"], 1, bn_eps)
        self.branch3x3 = nn.Sequential(
            ConvNormReLU(bottleneck, channels["reduce3x3"], 1, bn_eps),
            ConvNormReLU(channels["reduce3x3"], channels["branch3x3"], 3, bn_eps),
        )
        self.branch5x5 = nn.Sequential(
            ConvNormReLU(bottleneck, channels["reduce5x5"], 1, bn_eps),
            ConvNormReLU(channels["reduce5x5"], channels["branch5x5"], 5, bn_eps),
        )
        self.up_proj = nn.Linear(bottleneck, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        grid = self.grid_tracker.grid
        if grid is None:
            raise ValueError("MulConvAdapter needs the patch grid: run it inside the backbone it was injected into")
        x0 = nn.functional.relu(self.down_proj(hidden_states))
        prefix, patches = x0[:, : self.num_prefix_tokens], x0[:, self.num_prefix_tokens :]
        feature_map = tokens_to_map(patches, grid)
        mixed = torch.cat([branch(feature_map) for branch in (self.branch1x1, self.branch3x3, self.branch5x5)], dim=1)
        mixed = torch.cat((prefix, mixed.flatten(2).transpose(1, 2)), dim=1) + x0
        return self.up_proj(mixed)


class CrossImageEncoder(nn.TransformerEncoder):
    """Post-norm transformer encoder over the tokens of the images (GELU, ``num_layers`` layers).

    ``"batch"`` mode: the attention sequence is the batch of images, one sequence per token slot,
    as the official model (its ``batch_first=False`` encoder fed ``[B, T, D]``). ``"independent"``
    mode: every token of every image is a sequence of length one, i.e. each image alone.
    """

    def __init__(self, config: CricaVPRConfig) -> None:
        layer = nn.TransformerEncoderLayer(
            d_model=config.backbone_config.hidden_size,
            nhead=config.encoder_num_heads,
            dim_feedforward=config.encoder_ffn_dim,
            dropout=config.encoder_dropout,
            activation="gelu",
            layer_norm_eps=config.encoder_layer_norm_eps,
            batch_first=False,
        )
        super().__init__(layer, num_layers=config.encoder_num_layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, batch_mode: str) -> torch.Tensor:
        """``tokens`` ``[B, T, D]`` -> encoded ``[B, T, D]``."""
        batch, count, dim = tokens.shape
        if batch_mode == "independent":
            return super().forward(tokens.reshape(1, batch * count, dim)).reshape(batch, count, dim)
        if batch == 1:
            logger.warning_once(
                "CricaVPR batch_mode='batch' got a batch of one image: the cross-image encoder then sees that "
                "image alone, so its descriptor equals batch_mode='independent' and differs from the one it gets "
                "in a larger batch. Batch the images, or set batch_mode='independent' for batch-free descriptors."
            )
        return super().forward(tokens)


@dataclass
class CricaVPROutput(ModelOutput):
    """
    descriptors (`torch.FloatTensor` of shape `(batch_size, num_tokens * hidden_size)`):
        L2-normalised global descriptors (float32); in `"batch"` mode they depend on the whole batch.
    encoder_input (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        Per-image tokens entering the cross-image encoder: the class token, then one GeM vector per
        grid cell (2x2 cells, then 3x3 cells, row-major). Independent of the batch.
    token (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Backbone class token after the final norm.
    feature_map (`torch.FloatTensor` of shape `(batch_size, hidden_size, height / 14, width / 14)`):
        Backbone patch tokens after the final norm, as a feature map.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        Backbone hidden states: the embeddings' output, then each layer's, `(batch_size, tokens, hidden_size)`.
    """

    descriptors: torch.FloatTensor | None = None
    encoder_input: torch.FloatTensor | None = None
    token: torch.FloatTensor | None = None
    feature_map: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class CricaVPRPreTrainedModel(VPRPreTrainedModel):
    config: CricaVPRConfig
    config_class = CricaVPRConfig
    base_model_prefix = "cricavpr"
    # Recomputing a layer would update the adapters' batch-norm statistics twice.
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GridGeM):
            init.constant_(module.p, self.config.gem_p)

    def _init_adapter(self, adapter: nn.Module, module: nn.Module) -> None:
        """As the official training script: the up-projection starts at zero (a new adapter leaves the
        Dinov2 tokens unchanged) and every convolution's weights and biases at 1e-5; the
        down-projection keeps Dinov2's rule, the batch norms start as the identity."""
        if not isinstance(adapter, MulConvAdapter):
            return
        if module is adapter.up_proj:
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.constant_(module.weight, MULCONV_INIT)
            init.constant_(module.bias, MULCONV_INIT)


class CricaVPRModel(CricaVPRPreTrainedModel):
    """CricaVPR (Lu et al., CVPR 2024): cross-image correlation-aware place representations.

    * Backbone: frozen Dinov2; a trainable :class:`MulConvAdapter` beside the MLP of every layer,
      ``mlp(y) + adapter_scale * adapter(y)``.
    * Regional tokens: the class token plus GeM over the L2-normalised patch tokens of each cell of
      the k x k splits of the patch grid (``config.grid_splits``, official 2x2 and 3x3: 14 tokens;
      see ``grid_pooling`` for the cell rule, valid for any grid of at least 3 x 3 patches).
    * Cross-image encoder over those tokens, flattened and L2-normalised: ``[B, 14 * D]``.

    Batch semantics (``config.batch_mode``, or the ``batch_mode`` argument of ``forward``):

    * ``"batch"`` (default, the official behaviour and the one published numbers use): the encoder
      attends across the images of the forward batch, so an image's descriptor depends on which
      other images share its batch (and on the batch size). The result is equivariant to the order
      of the batch. A batch of one image gives exactly the ``"independent"`` descriptor (a warning
      says so once).
    * ``"independent"``: each image is encoded alone; descriptors do not depend on the batch.

    New adapters start with zero up-projections, i.e. as the plain Dinov2 backbone (see
    :meth:`_init_adapter`). Training (:func:`mark_trainable`) updates the adapters, the pooling and the
    cross-image encoder; Dinov2's own weights stay frozen.
    """

    def __init__(self, config: CricaVPRConfig) -> None:
        super().__init__(config)
        backbone_config = config.backbone_config
        self.backbone = self._adopt_backbone(build_backbone(backbone_config, config.pos_embed_rule))
        grid_tracker = PatchGridTracker(backbone_config.patch_size)
        self.backbone.embeddings.register_forward_pre_hook(grid_tracker, with_kwargs=True)
        inject_adapters(
            self.backbone,
            ADAPTER_NAME,
            "mlp",
            lambda _: MulConvAdapter(
                backbone_config.hidden_size,
                config.adapter_dim,
                config.adapter_channels,
                config.adapter_bn_eps,
                num_prefix_tokens(backbone_config),
                grid_tracker,
            ),
            scale=config.adapter_scale,
        )
        self.pooling = GridGeM(config.grid_splits, p=config.gem_p, eps=config.gem_eps)
        self.encoder = CrossImageEncoder(config)
        self.post_init()

    def mulconv_adapters(self) -> list[MulConvAdapter]:
        """The MulConv adapter of every backbone layer."""
        return adapter_modules(self.backbone, ADAPTER_NAME)

    def trainable_modules(self) -> list[nn.Module]:
        """The adapters, the regional GeM and the cross-image encoder."""
        return [*self.mulconv_adapters(), self.pooling, self.encoder]

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, batch_mode: str | None = None, output_hidden_states: bool | None = None
    ) -> CricaVPROutput:
        """``pixel_values`` ``[B, 3, H, W]`` (finite values); ``batch_mode`` overrides ``config.batch_mode``
        for this call."""
        batch_mode = batch_mode or self.config.batch_mode
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        backbone_config = self.config.backbone_config
        grid = patch_grid(pixel_values, backbone_config)
        check_grid(grid, self.config.grid_splits, backbone_config.patch_size)
        hidden, hidden_states = run_backbone(self.backbone, pixel_values, output_hidden_states=output_hidden_states)
        token, patch_tokens = hidden[:, 0], hidden[:, num_prefix_tokens(backbone_config) :]
        encoder_input = torch.cat((token[:, None], self.pooling(patch_tokens, grid)), dim=1)
        encoded = self.encoder(encoder_input, batch_mode)
        descriptors = nn.functional.normalize(encoded.flatten(1).float(), dim=-1)
        return CricaVPROutput(
            descriptors=descriptors,
            encoder_input=encoder_input,
            token=token,
            feature_map=tokens_to_map(patch_tokens, grid),
            hidden_states=hidden_states,
        )


__all__ = ["CricaVPRModel", "CricaVPROutput", "CricaVPRPreTrainedModel", "MulConvAdapter"]
