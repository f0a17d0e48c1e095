"""Build a fresh vprhub model on a Dinov2 backbone: tiny and random, or pretrained."""

from __future__ import annotations

from transformers import AutoConfig, Dinov2Config, PreTrainedModel

from .modeling import MODEL_CLASSES
from .modeling.backbone import load_backbone_weights, tiny_dinov2_config
from .utils import opening_source

TINY = "tiny"
# Head sizes scaled down with the tiny backbone, so CPU tests and demos stay fast.
TINY_HEADS = {
    "salad": dict(num_clusters=8, cluster_dim=16, token_dim=32, head_hidden_dim=64, image_size=[224, 224]),
    "selavpr": dict(local_hidden_dim=32, local_dim=16, image_size=[224, 224]),
    "cricavpr": dict(encoder_ffn_dim=128, image_size=[224, 224]),
    "megaloc": dict(
        num_clusters=8, cluster_dim=16, token_dim=32, head_hidden_dim=64, projection_dim=64, image_size=[224, 224]
    ),
}


def build_model(model_type: str, backbone: str = TINY, **config_overrides) -> PreTrainedModel:
    """A new ``model_type`` model whose backbone is ``"tiny"`` (random, small) or a pretrained Dinov2.

    ``backbone`` may be a Hub id (``"facebook/dinov2-base"``) or a local Dinov2 folder; its
    weights are loaded into the backbone, the heads and adapters stay freshly initialised.
    ``config_overrides`` are passed to the model config.
    """
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown model {model_type!r}; choose one of {sorted(MODEL_CLASSES)}")
    config_class, model_class = MODEL_CLASSES[model_type]
    if backbone == TINY:
        values = dict(TINY_HEADS.get(model_type, {}), **config_overrides)
        values.setdefault("backbone_config", tiny_dinov2_config())
        return model_class(config_class(**values))
    with opening_source(backbone, "backbone") as source:
        backbone_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        if not isinstance(backbone_config, Dinov2Config) and backbone_config.model_type != "dinov2_with_registers":
            raise ValueError(f"{backbone!r} is a {backbone_config.model_type!r} checkpoint, not a Dinov2 one")
        model = model_class(config_class(backbone_config=backbone_config, **config_overrides))
        load_backbone_weights(model.backbone, source)
    return model
