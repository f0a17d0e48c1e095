"""Training data: places (images grouped by place) from GSV-Cities, ``datasets`` or the synthetic generator."""

from .gsv_cities import GSVCities, gsv_cities_image_name
from .hf import HFPlaces, load_hf_places
from .places import UNREADABLE_IMAGE_ERRORS, PlaceImages, drop_small_places
from .sources import load_places
from .synthetic import SyntheticPlaces, write_gmberton_benchmark, write_gsv_cities

__all__ = [
    "GSVCities",
    "HFPlaces",
    "PlaceImages",
    "SyntheticPlaces",
    "UNREADABLE_IMAGE_ERRORS",
    "drop_small_places",
    "gsv_cities_image_name",
    "load_hf_places",
    "load_places",
    "write_gmberton_benchmark",
    "write_gsv_cities",
]
