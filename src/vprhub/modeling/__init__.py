"""vprhub models: SALAD, SelaVPR and CricaVPR on transformers' Dinov2."""

from .configuration_cricavpr import CricaVPRConfig
from .configuration_salad import SaladConfig
from .configuration_selavpr import SelaVPRConfig
from .image_processing import vpr_image_processor
from .modeling_cricavpr import CricaVPRModel, CricaVPROutput
from .modeling_salad import SaladModel, SaladOutput
from .modeling_selavpr import SelaVPRModel, SelaVPROutput
from .pretrained import VPRPreTrainedModel, mark_trainable

# model_type -> (config class, model class); `vprhub/__init__.py` registers them with the Auto classes.
MODEL_CLASSES = {
    "salad": (SaladConfig, SaladModel),
    "cricavpr": (CricaVPRConfig, CricaVPRModel),
    "selavpr": (SelaVPRConfig, SelaVPRModel),
}

__all__ = [
    "MODEL_CLASSES",
    "CricaVPRConfig",
    "CricaVPRModel",
    "CricaVPROutput",
    "SaladConfig",
    "SaladModel",
    "SaladOutput",
    "SelaVPRConfig",
    "SelaVPRModel",
    "SelaVPROutput",
    "VPRPreTrainedModel",
    "mark_trainable",
    "vpr_image_processor",
]
