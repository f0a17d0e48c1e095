"""vprhub models: SALAD, SelaVPR, CricaVPR and MegaLoc on transformers' Dinov2."""

from .configuration_cricavpr import CricaVPRConfig
from .configuration_megaloc import MegaLocConfig
from .configuration_salad import SaladConfig
from .configuration_selavpr import SelaVPRConfig
from .image_processing import vpr_image_processor
from .modeling_cricavpr import CricaVPRModel, CricaVPROutput
from .modeling_megaloc import MegaLocModel
from .modeling_salad import SaladModel, SaladOutput
from .modeling_selavpr import SelaVPRModel, SelaVPROutput

# model_type -> (config class, model class); `vprhub/__init__.py` registers them with the Auto classes.
MODEL_CLASSES = {
    "salad": (SaladConfig, SaladModel),
    "cricavpr": (CricaVPRConfig, CricaVPRModel),
    "selavpr": (SelaVPRConfig, SelaVPRModel),
    "megaloc": (MegaLocConfig, MegaLocModel),
}

__all__ = [
    "MODEL_CLASSES",
    "CricaVPRConfig",
    "CricaVPRModel",
    "CricaVPROutput",
    "MegaLocConfig",
    "MegaLocModel",
    "SaladConfig",
    "SaladModel",
    "SaladOutput",
    "SelaVPRConfig",
    "SelaVPRModel",
    "SelaVPROutput",
    "vpr_image_processor",
]
