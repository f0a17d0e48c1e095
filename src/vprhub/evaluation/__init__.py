"""Evaluation: benchmark readers, recall@K with faiss, descriptor extraction, `vprhub eval`.

``RECALL_METRIC_PATH`` is the folder of the ``evaluate`` metric module:
``evaluate.load(RECALL_METRIC_PATH)``.
"""

from pathlib import Path

from .benchmarks import KNOWN_BENCHMARKS, load_test_set
from .evaluator import default_local_scorer, evaluate_model, rerank_predictions
from .extract import extract_descriptors
from .geo_folder import parse_utm, read_geo_folder
from .msls import read_msls
from .npy_lists import read_npy_lists
from .recall import RecallResult, compute_recalls, recalls_from_predictions, search
from .testset import VPRTestSet, radius_positives

RECALL_METRIC_PATH = str(Path(__file__).parent / "metrics" / "recall_at_k")

__all__ = [
    "KNOWN_BENCHMARKS",
    "RECALL_METRIC_PATH",
    "RecallResult",
    "VPRTestSet",
    "compute_recalls",
    "default_local_scorer",
    "evaluate_model",
    "extract_descriptors",
    "load_test_set",
    "parse_utm",
    "radius_positives",
    "read_geo_folder",
    "read_msls",
    "read_npy_lists",
    "recalls_from_predictions",
    "rerank_predictions",
    "search",
]
