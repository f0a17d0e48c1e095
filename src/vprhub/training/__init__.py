"""Training: P x K place batches, multi-similarity loss with mining, accelerate loop, exact resume."""

from __future__ import annotations

import json
import logging
import sys

from accelerate import PartialState

from ..errors import USER_ERRORS
from .args import DataArguments, ModelArguments, TrainArguments, parse_args
from .checkpoint import TrainerState
from .loop import NonFiniteLossError, Trainer, TrainResult, train
from .losses import BatchTooSmallError, LossOutput, MultiSimilarityObjective, hardest_triplets, local_feature_loss
from .sampler import PlaceBatchSampler

__all__ = [
    "BatchTooSmallError",
    "DataArguments",
    "LossOutput",
    "ModelArguments",
    "MultiSimilarityObjective",
    "NonFiniteLossError",
    "PlaceBatchSampler",
    "TrainArguments",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "hardest_triplets",
    "local_feature_loss",
    "main",
    "parse_args",
    "train",
]


def main(argv: list[str] | None = None) -> int:
    """``train.py``: parse arguments, train, print the final evaluation; errors become one line and exit 1."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        result = train(*parse_args(argv))
    except (NonFiniteLossError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.eval_results is not None and PartialState().is_main_process:
        print(json.dumps(result.eval_results, indent=2))
    return 0
