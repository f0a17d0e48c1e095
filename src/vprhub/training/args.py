"""Training arguments: three dataclasses, read from the command line and/or a YAML/JSON recipe."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

MODEL_TYPES = ("salad", "selavpr", "cricavpr", "megaloc")
#: Defaults of the arguments left unset (``None``), with a pretrained backbone and with ``--backbone tiny``:
#: a random 64-wide Dinov2 learns on a CPU in a minute at these (initialised at std 0.1: at
#: transformers' 0.02 it barely depends on its input for the first dozens of steps).
BACKBONE_DEFAULTS = {
    "pretrained": {"image_size": [224, 224], "eval_image_size": None, "places_per_batch": 60, "learning_rate": 6e-5},
    "tiny": {
        "image_size": [56, 56],
        "eval_image_size": [56, 56],
        "places_per_batch": 8,
        "learning_rate": 1e-3,
        "initializer_range": 0.1,
    },
}
#: What ``--backbone tiny`` changes further for one model type: training arguments, and model config
#: fields (``--config_overrides`` wins). SelaVPR trains only adapters whose up-projections start at
#: zero (and GeM's p) on the frozen random backbone; at 1e-3 and the published MLP-adapter scale 0.2
#: they stay too small in 60 steps to move the descriptors (recall@1 gain +0.02 on average over
#: seeds 0-3); wider adapters at full scale and 1e-2 learn (+0.085, README "Training").
TINY_MODEL_DEFAULTS = {"selavpr": {"learning_rate": 1e-2}}
TINY_MODEL_CONFIGS = {"selavpr": {"parallel_adapter_scale": 1.0, "adapter_ratio": 4.0}}


@dataclass
class ModelArguments:
    """What to train."""

    model: str | None = field(default=None, metadata={"help": f"model type, one of {', '.join(MODEL_TYPES)}"})
    backbone: str = field(
        default="tiny",
        metadata={
            "help": "Dinov2 checkpoint: a Hub id (facebook/dinov2-base), a local folder, or 'tiny' (random, CPU)"
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "model config fields as 'key=value,key=value' (values parsed as JSON when possible)"},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "start from a trained vprhub model of type --model (a saved folder or Hub id) instead of "
            "building one on --backbone; its weights only, a fresh optimizer and schedule"
        },
    )

    def __post_init__(self):
        if self.model is None:
            raise ValueError(f"--model is required (one of {', '.join(MODEL_TYPES)})")
        if self.model not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_TYPES)}")
        if self.init_from is not None and (self.backbone != "tiny" or self.config_overrides):
            raise ValueError("--init_from brings its own backbone and config: drop --backbone and --config_overrides")

    def overrides(self) -> dict:
        """``config_overrides`` as a dict."""
        values = {}
        for item in filter(None, (self.config_overrides or "").split(",")):
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--config_overrides entries must be key=value, got {item!r}")
            try:
                values[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                values[key.strip()] = text
        return values


@dataclass
class DataArguments:
    """Where the images come from and how batches are made."""

    train_dataset: str = field(
        default="synthetic",
        metadata={"help": "GSV-Cities folder, image folder, saved/Hub `datasets` dataset, or 'synthetic'"},
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "benchmark folder (database/ + queries/), a name under --eval_data_root, "
            "a Hub dataset id, 'synthetic', or 'none' (default: 'synthetic' when training on "
            "synthetic places, else none)"
        },
    )
    eval_data_root: str | None = field(default=None, metadata={"help": "root folder for benchmark names"})
    positive_radius: float = field(
        default=25.0, metadata={"help": "metres within which a database image is a positive"}
    )
    train_split: str = field(default="train", metadata={"help": "split of a `datasets` training set"})
    image_column: str | None = field(default=None, metadata={"help": "image column of a `datasets` training set"})
    label_column: str | None = field(default=None, metadata={"help": "place-label column of a `datasets` training set"})
    places_per_batch: int | None = field(
        default=None, metadata={"help": "P: places per batch (per process); default 60, 8 with --backbone tiny"}
    )
    images_per_place: int = field(
        default=4, metadata={"help": "K: images of each place in a batch; smaller places are dropped"}
    )
    queries_per_batch: int = field(default=4, metadata={"help": "--loss triplet: queries per batch (per process)"})
    negatives_per_query: int = field(default=2, metadata={"help": "--loss triplet: hardest negatives per query"})
    negative_samples: int = field(
        default=1000, metadata={"help": "--loss triplet: database images drawn per cache round to mine negatives from"}
    )
    cache_refresh_rate: int = field(
        default=1000, metadata={"help": "--loss triplet: queries per cache round (descriptors recomputed each round)"}
    )
    queries_per_epoch: int = field(default=5000, metadata={"help": "--loss triplet: queries in an epoch"})
    train_positive_radius: float = field(
        default=10.0, metadata={"help": "--loss triplet: metres within which a database image may be the positive"}
    )
    image_size: list[int] | None = field(
        default=None, metadata={"help": "training resolution H W; default 224 224, 56 56 with --backbone tiny"}
    )
    eval_image_size: list[int] | None = field(
        default=None,
        metadata={"help": "evaluation resolution H W (default: the model config's image_size; 56 56 with tiny)"},
    )
    shuffle_across_cities: bool = field(
        default=False,
        metadata={"help": "GSV-Cities: mix cities in a batch (official: places shuffled within each city)"},
    )
    reshuffle_places: bool = field(
        default=True, metadata={"help": "draw a new place order every epoch (false: one fixed order, as CricaVPR)"}
    )
    drop_last_batch: bool = field(
        default=False, metadata={"help": "drop the last, incomplete place batch of an epoch (official: kept)"}
    )
    rand_augment_ops: int = field(default=3, metadata={"help": "RandAugment operations per image (0: none)"})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude bin (of 31)"})
    num_workers: int = field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        metadata={"help": "DataLoader worker processes (default: 4, at most the CPU count)"},
    )
    synthetic_places: int = field(default=200, metadata={"help": "places of a synthetic training set"})
    synthetic_views: int = field(default=4, metadata={"help": "views per place of a synthetic training set"})
    synthetic_eval_places: int = field(default=50, metadata={"help": "places of a synthetic evaluation set"})
    synthetic_difficulty: float = field(
        default=1.0, metadata={"help": "viewpoint/illumination change between synthetic views (0 to 1 and beyond)"}
    )

    def __post_init__(self):
        if self.eval_dataset is None and self.train_dataset == "synthetic":
            self.eval_dataset = "synthetic"
        if self.eval_dataset == "none":
            self.eval_dataset = None
        if (self.places_per_batch is not None and self.places_per_batch < 2) or self.images_per_place < 2:
            raise ValueError(
                "batch too small for mining: multi-similarity mining needs places_per_batch >= 2 and "
                f"images_per_place >= 2, got {self.places_per_batch} x {self.images_per_place}"
            )
        for name in ("image_size", "eval_image_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ValueError(f"--{name} takes two positive numbers (height width), got {value}")


@dataclass
class TrainArguments:
    """How to optimise, checkpoint, evaluate and report."""

    output_dir: str | None = field(default=None, metadata={"help": "where checkpoints, logs and the final model go"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh even if OUTPUT_DIR holds checkpoints"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the model initialisation, data order and augmentation"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_train_epochs; 0: only evaluate"})
    num_train_epochs: int = field(default=4, metadata={"help": "epochs when max_steps is -1"})
    optimizer: Literal["adamw", "adam", "sgd"] = field(default="adamw", metadata={"help": "optimizer"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "peak learning rate; default 6e-5, 1e-3 with --backbone tiny (selavpr: 1e-2)"}
    )
    weight_decay: float = field(default=9.5e-9, metadata={"help": "weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    lr_scheduler: Literal["linear", "step", "constant"] = field(
        default="linear", metadata={"help": "learning-rate schedule"}
    )
    lr_end_factor: float = field(default=0.2, metadata={"help": "linear: final fraction of the learning rate"})
    lr_decay_steps: int = field(default=4000, metadata={"help": "linear: steps over which the rate decays"})
    lr_step_epochs: int = field(default=3, metadata={"help": "step: epochs between decays"})
    lr_gamma: float = field(default=0.5, metadata={"help": "step: decay factor"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping norm (0: off)"})
    loss: Literal["multi_similarity", "triplet"] = field(
        default="multi_similarity",
        metadata={
            "help": "multi_similarity: P x K place batches with online mining (SALAD, CricaVPR); triplet: "
            "queries with mined positives and cached hard negatives (SelaVPR; --train_dataset a query/database set)"
        },
    )
    triplet_margin: float = field(default=0.1, metadata={"help": "--loss triplet: margin of the triplet loss (L2)"})
    ms_alpha: float = field(default=1.0, metadata={"help": "multi-similarity loss alpha"})
    ms_beta: float = field(default=50.0, metadata={"help": "multi-similarity loss beta"})
    ms_base: float = field(default=0.0, metadata={"help": "multi-similarity loss base"})
    miner_epsilon: float = field(default=0.1, metadata={"help": "multi-similarity miner epsilon"})
    gather_across_processes: bool = field(
        default=False, metadata={"help": "mine over the batches of all processes (global batch)"}
    )
    local_loss_weight: float = field(
        default=0.0, metadata={"help": "selavpr: weight of the local mutual-nearest-neighbour triplet loss (0: off)"}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "autocast precision"})
    attn_implementation: Literal["sdpa", "eager"] = field(
        default="sdpa", metadata={"help": "attention of the backbone: sdpa (torch's fused kernels) or eager"}
    )
    fused_optimizer: bool = field(
        default=True, metadata={"help": "torch's fused optimizer step (one kernel for all parameters)"}
    )
    torch_compile: bool = field(default=False, metadata={"help": "run the model through torch.compile"})
    torch_compile_backend: str = field(default="inductor", metadata={"help": "--torch_compile: the backend"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    ddp_find_unused_parameters: bool = field(
        default=False,
        metadata={"help": "multi-process: let DDP tolerate trainable parameters that get no gradient"},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute backbone activations in backward"})
    save_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps (0: never)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep the N newest checkpoints (0: all)"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "checkpoint folder, or 'latest' for the newest one in OUTPUT_DIR"}
    )
    resume_without_rng_state: bool = field(
        default=False,
        metadata={"help": "resume even if the checkpoint's random-number state is unreadable (inexact resume)"},
    )
    eval_batch_size: int = field(default=16, metadata={"help": "images per forward pass at evaluation"})
    eval_every_epochs: int = field(default=1, metadata={"help": "evaluate every N epochs (and at the end)"})
    eval_rerank_num: int = field(
        default=0, metadata={"help": "re-rank the top N global candidates with local features at evaluation (0: off)"}
    )
    eval_on_start: bool = field(default=False, metadata={"help": "also evaluate the model before training"})
    metric_for_best_model: str = field(default="recall@1", metadata={"help": "metric that picks the best model"})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "save the best evaluated model, not the last"})
    early_stopping_patience: int = field(
        default=0, metadata={"help": "stop after N evaluations without improvement (0: off)"}
    )
    logging_steps: int = field(default=10, metadata={"help": "send averages to the trackers every N steps"})
    report_to: str = field(
        default="auto", metadata={"help": "accelerate trackers: auto (tensorboard if installed), none, or names"}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "no progress bar"})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the final model to"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repo as private"})

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required")
        for f in dataclasses.fields(self):
            choices = typing.get_args(typing.get_type_hints(type(self))[f.name])
            if (
                typing.get_origin(typing.get_type_hints(type(self))[f.name]) is Literal
                and getattr(self, f.name) not in choices
            ):
                raise ValueError(f"--{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.max_steps < -1:
            raise ValueError(f"--max_steps must be -1, 0 or positive, got {self.max_steps}")
        for name in (
            "gradient_accumulation_steps",
            "eval_batch_size",
            "eval_every_epochs",
            "logging_steps",
            "num_train_epochs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not all(part.startswith("recall@") for part in self.metric_for_best_model.split("+")):
            raise ValueError(
                f"--metric_for_best_model must be recall@K or a sum like recall@1+recall@5, "
                f"got {self.metric_for_best_model!r}"
            )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def apply_backbone_defaults(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> None:
    """Fill the arguments left ``None`` from ``BACKBONE_DEFAULTS`` (``tiny``, or ``pretrained`` also
    for ``--init_from``)."""
    tiny = model_args.backbone == "tiny" and model_args.init_from is None
    defaults = BACKBONE_DEFAULTS["tiny" if tiny else "pretrained"]
    if tiny:
        defaults = {**defaults, **TINY_MODEL_DEFAULTS.get(model_args.model, {})}
    for holder in (data_args, args):
        for name, value in defaults.items():
            if hasattr(holder, name) and getattr(holder, name) is None:
                setattr(holder, name, list(value) if isinstance(value, list) else value)


def _read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown argument(s) {unknown}")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Parse ``argv``; ``--config FILE`` (YAML or JSON) supplies defaults that the command line overrides."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments (command line wins)")
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_read_config(known.config))
    model_args, data_args, train_args, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return model_args, data_args, train_args
