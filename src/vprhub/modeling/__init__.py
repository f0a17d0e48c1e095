"""vprhub models: SALAD, SelaVPR and CricaVPR on transformers' Dinov2."""

from .configuration_salad import SaladConfig
from .image_processing import vpr_image_processor
from .modeling_salad import SaladModel, SaladOutput

# model_type -> (config class, model class); `vprhub/__init__.py` registers them with the Auto classes.
MODEL_CLASSES = {
    "salad": (SaladConfig, SaladModel),
}

__all__ = ["MODEL_CLASSES", "SaladConfig", "SaladModel", "SaladOutput", "vpr_image_processor"]
