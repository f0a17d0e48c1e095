"""The training loop: accelerate, place batches, multi-similarity loss, checkpoints, evaluation, output."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    RNG_STATE_NAME,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    is_tensorboard_available,
    set_seed,
)
from accelerate.utils import load as load_accelerate_file
from tqdm.auto import tqdm

from ..allocator import retain_freed_memory
from ..data import PlaceImages, load_places, write_gmberton_benchmark
from ..data.geo_triplets import GeoImages, GeoTriplets, load_geo_triplets
from ..data.transforms import RandAugment
from ..evaluation import evaluate_model
from ..factory import TINY, build_model
from ..hub import push_model
from ..modeling import mark_trainable
from ..modeling.backbone import tiny_dinov2_config
from ..modeling.image_processing import vpr_image_processor
from ..modeling.local_matching import local_triplet_loss
from ..loading import check_model_type, load_model
from ..errors import short_error
from ..utils import MODEL_FOLDER, atomic_write_dir, atomic_write_file, opening_source, recover_dir
from .args import BACKBONE_DEFAULTS, TINY_MODEL_CONFIGS, DataArguments, ModelArguments, TrainArguments, apply_backbone_defaults
from .checkpoint import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    CheckpointError,
    TrainerState,
    check_model_file,
    list_checkpoints,
    read_torch_file,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import AugmentedPlaces, PlaceBatchCollator
from .evaluation import K_VALUES, evaluate_recall, extract, load_eval_set
from .losses import BatchTooSmallError, MultiSimilarityObjective, local_feature_loss
from .optimization import build_optimizer, build_scheduler, trainable_parameters
from .sampler import PlaceBatchSampler
from .triplets import CachedTripletSampler, TripletObjective

logger = logging.getLogger(__name__)

BEST_MODEL = "best-model"
RESULTS_FILE = "eval_results.json"
FINAL_SAVE = "final-save"  # the final model's files are written in ``.final-save.<pid>.<random>.tmp``


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; training stopped and nothing from that step on was saved."""


@dataclass
class TrainResult:
    """What ``train`` returns: the final state (with the per-step ``log_history``), the results
    written to ``eval_results.json`` (``None`` without an evaluation set) and the last checkpoint."""

    output_dir: Path
    state: TrainerState
    eval_results: dict | None
    last_checkpoint: Path | None


def _trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    return [name.strip() for name in report_to.split(",") if name.strip()]


def _tracker_config(*groups) -> dict:
    config = {}
    for group in groups:
        for key, value in dataclasses.asdict(group).items():
            config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def _check_output_dir(output_dir: Path) -> None:
    """``--output_dir`` is a folder, or can become one: no file stands at it or above it."""
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir}: {existing} is a file, not a folder")


def _prepare_output_dir(args: TrainArguments, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """The checkpoints folder and the checkpoint to resume from; refuses to mix two runs."""
    _check_output_dir(Path(args.output_dir))
    checkpoints = Path(args.output_dir) / "checkpoints"
    if args.resume_from_checkpoint:
        return checkpoints, resolve_checkpoint(args.resume_from_checkpoint, checkpoints)
    if list_checkpoints(checkpoints) and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints; pass --resume_from_checkpoint latest to continue "
            "or --overwrite_output_dir to start afresh"
        )
    if (Path(args.output_dir) / "config.json").is_file() and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{args.output_dir} already holds a trained model; pass --overwrite_output_dir to replace it "
            "or choose another --output_dir"
        )
    if accelerator.is_main_process:  # remove only what an earlier run wrote, never other files
        for old in list_checkpoints(checkpoints):
            shutil.rmtree(old)
        if MODEL_FOLDER.recognise(checkpoints / BEST_MODEL):
            shutil.rmtree(checkpoints / BEST_MODEL)
    accelerator.wait_for_everyone()
    return checkpoints, None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (transformers' activation checkpointing); error if unsupported."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _load_trained_model(source: str, model_type: str) -> torch.nn.Module:
    """The saved vprhub model ``source`` (``--init_from``), refused unless it is a ``model_type`` model."""
    with opening_source(source, "--init_from") as resolved:
        found = check_model_type(resolved, f"--init_from {source}")
    if found != model_type:
        raise ValueError(f"--init_from {source} is a {found!r} model, not the --model {model_type!r}")
    return load_model(source, "--init_from")


def _mark_trainable(model: torch.nn.Module, args: TrainArguments) -> None:
    """Choose the trained parameters with ``mark_trainable``. The SelaVPR local head only learns from
    the local loss: without it, it is frozen (so that data-parallel training sees no parameter
    without gradient)."""
    local_head = getattr(model, "local_head", None)
    if args.local_loss_weight and local_head is None:
        raise ValueError(f"--local_loss_weight needs a model with local features (selavpr), not {type(model).__name__}")
    if args.eval_rerank_num and local_head is None:
        raise ValueError(f"--eval_rerank_num needs a model with local features (selavpr), not {type(model).__name__}")
    frozen = ["local_head"] if local_head is not None and not args.local_loss_weight else []
    trainable, total = mark_trainable(model, frozen=frozen)
    logger.info("training %d of %d parameters%s", trainable, total, " (local head frozen: --local_loss_weight is 0)" if frozen else "")


def _save_final(
    accelerator: Accelerator, model: torch.nn.Module, image_processor, output_dir: Path, results: dict | None
) -> None:
    """``save_pretrained`` model (with its modeling code) and image processor into ``output_dir``,
    each file renamed into place; ``eval_results.json`` last."""
    if not accelerator.is_main_process:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    # Named as atomic_write_dir names its temporaries (with the writer's pid), so that what a killed
    # save left is found and removed here by the next one.
    recover_dir(output_dir / FINAL_SAVE)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FINAL_SAVE}.{os.getpid()}.", suffix=".tmp", dir=output_dir))
    try:
        model.save_pretrained(tmp)  # with its modeling code and auto_map
        image_processor.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if results is not None:
        with atomic_write_file(output_dir / RESULTS_FILE, "w") as handle:
            json.dump(results, handle, indent=2)


def apply_speed_options(model: torch.nn.Module, args: TrainArguments) -> None:
    """``--attn_implementation`` and ``--torch_compile`` (compiled in place: state-dict names unchanged)."""
    model.set_attn_implementation(args.attn_implementation)
    if args.torch_compile:
        model.compile(backend=args.torch_compile_backend)


class Trainer:
    """One training run; ``train()`` is the entry point, this class only keeps the pieces together."""

    def __init__(
        self,
        model_args: ModelArguments,
        data_args: DataArguments,
        args: TrainArguments,
        model: torch.nn.Module | None = None,
        places: PlaceImages | None = None,
    ):
        apply_backbone_defaults(model_args, data_args, args)
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self.trackers = _trackers(args.report_to)
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            # Without this, processes started by torchrun on a machine without an accelerator would
            # each train alone (accelerate only joins CPU processes into one group when told ``cpu``).
            cpu=not torch.accelerator.is_available(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=self.trackers or None,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        if self.accelerator.device.type == "cpu":
            retain_freed_memory()
        self.checkpoints, self.resume_from = _prepare_output_dir(args, self.accelerator)
        set_seed(args.seed)
        if model is None and model_args.init_from is not None:
            model = _load_trained_model(model_args.init_from, model_args.model)
        if model is None:
            overrides = model_args.overrides()
            if model_args.backbone == TINY:
                overrides = {**TINY_MODEL_CONFIGS.get(model_args.model, {}), **overrides}
                if "backbone_config" not in overrides:
                    initializer_range = BACKBONE_DEFAULTS["tiny"]["initializer_range"]
                    overrides["backbone_config"] = tiny_dinov2_config(initializer_range=initializer_range)
            model = build_model(model_args.model, model_args.backbone, **overrides)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        _mark_trainable(model, args)
        apply_speed_options(model, args)

        size = tuple(data_args.image_size)
        if args.loss == "triplet":
            if places is not None:
                raise ValueError("--loss triplet reads a query/database set; pass the data as --train_dataset")
            triplets = self._load_triplets(size)
            self.places = GeoImages(triplets)
            self.sampler = CachedTripletSampler(
                triplets,
                data_args.queries_per_batch,
                data_args.negatives_per_query,
                data_args.negative_samples,
                data_args.cache_refresh_rate,
                data_args.queries_per_epoch,
                seed=args.seed,
            )
            self.sampler.describe = self._describe_for_mining
            self.mining_processor = vpr_image_processor(*size)
            self.objective = TripletObjective(args.triplet_margin, data_args.negatives_per_query)
        else:
            self.places = places if places is not None else self._load_places(size)
            self.sampler = PlaceBatchSampler(
                self.places.labels,
                data_args.places_per_batch,
                data_args.images_per_place,
                seed=args.seed,
                groups=None if data_args.shuffle_across_cities else self.places.groups,
                drop_last=data_args.drop_last_batch,
                reshuffle_places=data_args.reshuffle_places,
            )
            self.objective = MultiSimilarityObjective(
                args.ms_alpha, args.ms_beta, args.ms_base, args.miner_epsilon, args.gather_across_processes
            )
        augment = (
            RandAugment(data_args.rand_augment_ops, data_args.rand_augment_magnitude)
            if data_args.rand_augment_ops
            else None
        )
        loader = torch.utils.data.DataLoader(
            AugmentedPlaces(self.places, size, augment),
            batch_sampler=self.sampler,
            collate_fn=PlaceBatchCollator(vpr_image_processor(*size)),
            num_workers=data_args.num_workers,
            generator=torch.Generator().manual_seed(args.seed),  # iterator creation leaves the global RNG alone
        )
        eval_size = tuple(data_args.eval_image_size or model.config.image_size)
        self.eval_processor = vpr_image_processor(*eval_size)
        self.test_set = None
        if data_args.eval_dataset:
            with self.accelerator.main_process_first():
                self.test_set = load_eval_set(
                    data_args.eval_dataset,
                    self.output_dir,
                    data_args.eval_data_root,
                    data_args.positive_radius,
                    data_args.synthetic_eval_places,
                    eval_size,
                    args.seed,
                    data_args.synthetic_difficulty,
                )

        optimizer = build_optimizer(trainable_parameters(model), args)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        # After prepare: the loader holds this process's share of the batches, so an epoch is one
        # pass over the data whatever the number of processes.  The scheduler is stepped here once
        # per optimiser step (accelerate would step it once per process), so the learning-rate
        # curve by optimiser step does not depend on the number of processes.
        self.steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        self.scheduler = build_scheduler(optimizer, args, self.steps_per_epoch)
        self.accelerator.register_for_checkpointing(self.scheduler)  # read back only after _resume's check
        self.max_steps = args.max_steps if args.max_steps >= 0 else args.num_train_epochs * self.steps_per_epoch
        self.state = TrainerState()
        self.last_checkpoint: Path | None = None
        self.last_batch: torch.Tensor | None = None  # pixel values of the last trained batch
        self.unreadable: dict[int, str] = {}  # image index -> why it could not be read (each logged once)

    def batch_summary(self) -> str:
        """One line: processes x places x images (x accumulation) = global batch, where the loss is
        computed, and the epoch length in optimiser steps."""
        data_args, args = self.data_args, self.args
        processes = self.accelerator.num_processes
        if args.loss == "triplet":
            group = 2 + data_args.negatives_per_query
            factors = [processes, data_args.queries_per_batch, group]
            text = f"{processes} processes x {data_args.queries_per_batch} queries x {group} images"
        else:
            factors = [processes, data_args.places_per_batch, data_args.images_per_place]
            text = f"{processes} processes x {data_args.places_per_batch} places x {data_args.images_per_place} images"
        if args.gradient_accumulation_steps > 1:
            factors.append(args.gradient_accumulation_steps)
            text += f" x {args.gradient_accumulation_steps} accumulated batches"
        if args.loss == "triplet":
            scope = "triplets mined from a descriptor cache, loss per process"
        elif processes == 1:
            scope = "loss over the whole batch"
        elif args.gather_across_processes:
            scope = "loss over the batches of all processes, gathered"
        else:
            scope = "loss within each process's batch; --gather_across_processes mines the global batch"

        compiled = f"torch.compile ({args.torch_compile_backend})" if args.torch_compile else "not compiled"
        return (
            f"global batch: {text} = {math.prod(factors)} images per optimiser step ({scope}); "
            f"{self.steps_per_epoch} optimiser steps per epoch, {self.max_steps} in all; "
            f"precision {self.accelerator.mixed_precision}, {args.attn_implementation} attention, "
            f"{'fused' if args.fused_optimizer else 'unfused'} {args.optimizer}, {compiled}"
        )

    def _resume(self) -> TrainerState:
        """Load ``self.resume_from``; every file is checked first and read without running pickled code,
        so a damaged, unsafe or foreign checkpoint is one error naming its file."""
        checkpoint = self.resume_from
        state = TrainerState.load(checkpoint)
        check_model_file(checkpoint, self.accelerator.unwrap_model(self.model))
        read_torch_file(checkpoint, OPTIMIZER_FILE)
        # accelerate unpickles the registered scheduler state with ``weights_only=False``: only once a
        # ``weights_only`` read has shown that the file holds plain data, no code to run.
        read_torch_file(checkpoint, SCHEDULER_FILE)
        self._check_rng_state()
        try:
            self.accelerator.load_state(str(checkpoint))
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as error:  # states that do not fit
            raise CheckpointError(checkpoint, "state", short_error(error)) from None
        return state

    def _check_rng_state(self) -> None:
        """accelerate skips an unreadable RNG state with an INFO line, which makes the resume inexact:
        an error here, unless ``--resume_without_rng_state`` accepts it (with a warning)."""
        path = self.resume_from / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl"
        try:
            load_accelerate_file(path)
        except Exception as error:  # whatever torch.load raises on a missing or corrupt file
            message = f"{path}: unreadable random-number state ({type(error).__name__}: {short_error(error)})"
            if not self.args.resume_without_rng_state:
                raise ValueError(
                    f"{message}; the resumed run would not be exact. Pass --resume_without_rng_state to continue anyway"
                ) from None
            logger.warning("%s; continuing with fresh random states (--resume_without_rng_state): "
                           "the run will differ from an uninterrupted one", message)

    def _adopt_best_model(self) -> None:
        """Resuming a run whose best model lives beside the checkpoint, outside ``--output_dir``: copy it in."""
        target = self.checkpoints / BEST_MODEL
        if self.state.best_step is None or not self.args.load_best_model_at_end or target.is_dir():
            return
        source = self.resume_from.parent / BEST_MODEL
        if not source.is_dir():
            raise FileNotFoundError(
                f"{self.resume_from} records a best model (step {self.state.best_step}) but {source} is missing; "
                "pass --load_best_model_at_end false to keep the last model instead"
            )
        if self.accelerator.is_main_process:
            with atomic_write_dir(target, overwrite=True, kind=MODEL_FOLDER) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
        self.accelerator.wait_for_everyone()

    def _load_triplets(self, size: tuple[int, int]) -> GeoTriplets:
        """``--loss triplet`` data: an MSLS root or a query/database folder; ``synthetic`` writes a small
        map under OUTPUT_DIR (``synthetic_views - 1`` database views and one query view per place)."""
        data_args = self.data_args
        source = data_args.train_dataset
        if source == "synthetic":
            source = self.output_dir / (
                f"synthetic-triplets-{self.args.seed}-{data_args.synthetic_places}-{size[0]}x{size[1]}-"
                f"{data_args.synthetic_difficulty}"
            )
            with self.accelerator.main_process_first():
                if not source.is_dir():
                    write_gmberton_benchmark(
                        source, data_args.synthetic_places, max(1, data_args.synthetic_views - 1), 1, size,
                        seed=self.args.seed, split="train", difficulty=data_args.synthetic_difficulty,
                    )  # fmt: skip
            source = source / "images" / "train"
        return load_geo_triplets(source, data_args.train_positive_radius, data_args.positive_radius)

    def _describe_for_mining(self, indices: np.ndarray) -> np.ndarray:
        """Descriptors of training images (global indices) by the current model in eval mode, on every process."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            paths = [self.places.paths[i] for i in indices]
            return extract(
                self.accelerator, model, paths, self.mining_processor, self.args.eval_batch_size,
                self.data_args.num_workers,
            )  # fmt: skip
        finally:
            model.train(was_training)

    def _load_places(self, size: tuple[int, int]) -> PlaceImages:
        data_args = self.data_args
        return load_places(
            data_args.train_dataset,
            min_images_per_place=data_args.images_per_place,
            split=data_args.train_split,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            synthetic_places=data_args.synthetic_places,
            synthetic_views=data_args.synthetic_views,
            image_size=size,
            seed=self.args.seed,
            synthetic_difficulty=data_args.synthetic_difficulty,
        )

    # ----------------------------------------------------------------- steps
    def _loss(self, batch: dict) -> tuple[torch.Tensor, float]:
        """The batch loss (global batch with ``gather_across_processes``) and its ``batch_acc``."""
        outputs = self.model(pixel_values=batch["pixel_values"])
        try:
            result = self.objective(outputs.descriptors, batch["labels"])
        except BatchTooSmallError as error:  # only after unreadable images were skipped
            logger.warning("step %d: no loss for this batch (%s)", self.state.global_step + 1, error)
            return outputs.descriptors.sum() * 0.0, float("nan")
        loss = result.loss
        if self.args.local_loss_weight:
            if isinstance(self.objective, TripletObjective):
                local = outputs.local_features
                anchors, positives, negatives = result.mined
                local_loss = local_triplet_loss(local[anchors], local[positives], local[negatives])
            else:
                local_loss = local_feature_loss(outputs.local_features, outputs.descriptors, batch["labels"])
            loss = loss + self.args.local_loss_weight * local_loss
        return loss, result.batch_acc

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min()
        if not bool(finite):
            where = (
                f"last good checkpoint: {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"the loss is {loss.item()} at step {self.state.global_step + 1} (epoch {self.state.epoch}); "
                f"training stopped before applying it ({where}). Try a lower learning rate, "
                "--max_grad_norm, or --mixed_precision no."
            )

    @torch.no_grad()
    def _check_trained_model(self) -> None:
        """Before a checkpoint, an evaluation or the final save: the trainable weights and the descriptors of
        the last training batch (eval mode) must be finite, on every process; else stop, saving nothing."""
        if self.last_batch is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if not bad:
            was_training = model.training
            model.eval()
            with self.accelerator.autocast():
                descriptors = model(pixel_values=self.last_batch).descriptors
            model.train(was_training)
            if not torch.isfinite(descriptors).all():
                bad = ["the descriptors of the last batch"]
        everywhere_finite = self.accelerator.gather(torch.tensor([float(not bad)], device=self.accelerator.device))
        if bool(everywhere_finite.min()):
            return
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved"
        what = f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}" if bad else "on another process"
        raise NonFiniteLossError(
            f"the model became non-finite at step {self.state.global_step} ({what}); training stopped and "
            f"nothing from this step was saved ({where}). Try a lower learning rate or --max_grad_norm."
        )

    def _note_unreadable(self, batch: dict) -> None:
        """Log each unreadable image of ``batch`` the first time it is met."""
        for index, reason in batch["unreadable"]:
            if index not in self.unreadable:
                self.unreadable[index] = reason
                logger.warning("%s: skipping unreadable image %d (%s)", self.places.name, index, reason)

    def _check_epoch_trained(self, stepped: bool, whole_epoch: bool) -> None:
        """An epoch read from its start without one optimiser step had no readable image: stop, as
        every further epoch would read the same files."""
        if stepped or not whole_epoch:
            return
        example = next(iter(self.unreadable.values()), "no image in the batches")
        raise ValueError(
            f"{self.places.name}: no training image could be read in epoch {self.state.epoch} "
            f"({len(self.unreadable)} unreadable, e.g. {example}); check --train_dataset"
        )

    def _train_batch(self, batch: dict) -> tuple[float, float] | None:
        if batch["pixel_values"].numel() == 0:
            if self.accelerator.num_processes > 1:
                raise RuntimeError(
                    "every image of a batch is unreadable; fix the dataset before multi-process training"
                )
            return None
        self.last_batch = batch["pixel_values"]
        with self.accelerator.accumulate(self.model):
            loss, batch_acc = self._loss(batch)
            self._check_finite(loss)
            # A gathered loss is the same on every process: undo the gradient averaging.
            scale = self.accelerator.num_processes if self.args.gather_across_processes else 1
            self.accelerator.backward(loss * scale)
            if self.args.max_grad_norm and self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            if self.accelerator.sync_gradients and not self.accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return self.accelerator.reduce(loss.detach().float(), "mean").item(), batch_acc

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """Recall@K of the current model; keeps the best model and counts evaluations without gain."""
        if self.test_set is None:
            return None
        self._check_trained_model()
        model = self.accelerator.unwrap_model(self.model)
        if self.args.eval_rerank_num:
            results = self._evaluate_reranked(model)
        else:
            results = evaluate_recall(
                self.accelerator,
                model,
                self.test_set,
                self.eval_processor,
                self.args.eval_batch_size,
                self.data_args.num_workers,
            )
        state = self.state
        results.update(global_step=state.global_step, epoch=state.epoch)
        state.last_eval_step = state.global_step
        state.log_history.append({"step": state.global_step, "eval": results})
        if self.trackers:
            self.accelerator.log(
                {f"eval/{k}": v for k, v in results.items() if k.startswith("recall@")}, step=state.global_step
            )
        self.accelerator.print(
            f"step {state.global_step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("recall@"))
        )
        metric = sum(results[name] for name in self.args.metric_for_best_model.split("+"))
        if state.best_metric is None or metric > state.best_metric:
            state.best_metric, state.best_step, state.evaluations_without_improvement = metric, state.global_step, 0
            state.best_results = results
            if self.accelerator.is_main_process:
                with atomic_write_dir(self.checkpoints / BEST_MODEL, overwrite=True, kind=MODEL_FOLDER) as tmp:
                    model.save_pretrained(tmp)
            self.accelerator.wait_for_everyone()
        else:
            state.evaluations_without_improvement += 1
        return results

    def _evaluate_reranked(self, model: torch.nn.Module) -> dict:
        """Recall@K after re-ranking the top ``eval_rerank_num`` by local matching (SelaVPR's validation),
        computed on the main process and shared with the others."""
        results = None
        if self.accelerator.is_main_process:
            was_training = model.training
            model.eval()
            try:
                results = evaluate_model(
                    model,
                    self.eval_processor,
                    self.test_set,
                    batch_size=self.args.eval_batch_size,
                    device=self.accelerator.device,
                    k_values=K_VALUES,
                    rerank=True,
                    rerank_num=self.args.eval_rerank_num,
                    num_workers=self.data_args.num_workers,
                    progress=False,
                )
            finally:
                model.train(was_training)
            results.pop("seconds")
        return broadcast_object_list([results])[0]

    # ------------------------------------------------------------------ loop
    def _record(self, losses: list[float], accuracies: list[float], skipped: int) -> None:
        state = self.state
        entry = {
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": sum(losses) / len(losses),
            "batch_acc": sum(accuracies) / len(accuracies),
            "lr": self.scheduler.get_last_lr()[0],
        }
        state.log_history.append(entry)
        state.skipped_images += skipped
        if self.trackers and state.global_step % self.args.logging_steps == 0:
            recent = [e for e in state.log_history[-self.args.logging_steps :] if "loss" in e]
            self.accelerator.log(
                {
                    "train/loss": sum(e["loss"] for e in recent) / len(recent),
                    "train/batch_acc": sum(e["batch_acc"] for e in recent) / len(recent),
                    "train/lr": entry["lr"],
                    "train/skipped_images": state.skipped_images,
                },
                step=state.global_step,
            )

    def _end_of_epoch(self) -> bool:
        """Advance the epoch; evaluate when due. Returns whether early stopping triggers."""
        self.state.epoch += 1
        self.state.batches_in_epoch = 0
        if self.state.epoch % self.args.eval_every_epochs == 0:
            self.evaluate()
        patience = self.args.early_stopping_patience
        return bool(patience) and self.state.evaluations_without_improvement >= patience

    def train(self) -> TrainResult:
        accelerator, state = self.accelerator, self.state
        if self.resume_from is not None:
            self.state = state = self._resume()
            self._adopt_best_model()
            self.last_checkpoint = self.resume_from
            accelerator.print(f"resumed from {self.resume_from} at step {state.global_step}")
        if self.trackers:
            accelerator.init_trackers("vprhub", config=_tracker_config(self.model_args, self.data_args, self.args))
        accelerator.print(self.batch_summary())
        if self.args.eval_on_start and state.global_step == 0 and state.last_eval_step is None:
            self.evaluate()
        self.model.train()
        progress = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc="training",
            disable=self.args.disable_tqdm or not accelerator.is_local_main_process,
        )
        stop = state.global_step >= self.max_steps
        losses, accuracies, skipped = [], [], 0
        while not stop:
            self.sampler.set_epoch(state.epoch)
            self.loader.set_epoch(state.epoch)
            whole_epoch, stepped_in_epoch = state.batches_in_epoch == 0, False
            batches = self.loader if whole_epoch else accelerator.skip_first_batches(self.loader, state.batches_in_epoch)
            for batch in batches:
                self._note_unreadable(batch)
                outcome = self._train_batch(batch)
                skipped += int(accelerator.reduce(batch["num_skipped"], "sum").item())
                if outcome is not None:
                    losses.append(outcome[0])
                    accuracies.append(outcome[1])
                state.batches_in_epoch += 1
                stepped = accelerator.sync_gradients and losses
                if stepped:
                    stepped_in_epoch = True
                    state.global_step += 1
                    self._record(losses, accuracies, skipped)
                    progress.update(1)
                    progress.set_postfix(loss=f"{losses[-1]:.4f}", b_acc=f"{accuracies[-1]:.3f}")
                    losses, accuracies, skipped = [], [], 0
                if state.batches_in_epoch == len(self.loader):
                    self._check_epoch_trained(stepped_in_epoch, whole_epoch)
                    stop = self._end_of_epoch()
                if stepped and self.args.save_steps and state.global_step % self.args.save_steps == 0:
                    self._check_trained_model()
                    self.last_checkpoint = save_checkpoint(
                        accelerator, self.checkpoints, state, self.args.save_total_limit
                    )
                if stop or state.global_step >= self.max_steps:
                    stop = True
                    break
        progress.close()
        return self._finish()

    def _finish(self) -> TrainResult:
        accelerator, state = self.accelerator, self.state
        self._check_trained_model()
        model = accelerator.unwrap_model(self.model)
        results = None
        if self.test_set is not None:
            if state.last_eval_step != state.global_step:
                self.evaluate()
            results = state.best_results if self.args.load_best_model_at_end else state.log_history[-1]["eval"]
            if self.args.load_best_model_at_end and state.best_step != state.global_step:
                best = type(model).from_pretrained(self.checkpoints / BEST_MODEL)
                model.load_state_dict(best.state_dict())
                metric = self.args.metric_for_best_model
                accelerator.print(f"kept the best model: step {state.best_step}, {metric} {state.best_metric:.4f}")
            results = {
                **results,
                "model": self.model_args.model,
                "train_dataset": self.places.name,
                "train_images": len(self.places),
                "train_places": self.places.num_places,
                "dropped_places": self.places.dropped_places,
                "dropped_images": self.places.dropped_images,
                "skipped_images": state.skipped_images,
            }
        _save_final(accelerator, model, self.eval_processor, self.output_dir, results)
        if accelerator.is_main_process:
            state.save(self.output_dir)
        if self.args.push_to_hub and accelerator.is_main_process:
            self._push(model, results)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(self.output_dir, state, results, self.last_checkpoint)

    def _push(self, model: torch.nn.Module, results: dict | None) -> None:
        recalls = {k: v for k, v in (results or {}).items() if k.startswith("recall@")}
        args, data_args = self.args, self.data_args
        training = {
            "dataset": self.places.name,
            "backbone": self.model_args.backbone,
            "steps": self.state.global_step,
            "batch": f"{data_args.places_per_batch} places x {data_args.images_per_place} images",
            "image_size": "x".join(map(str, data_args.image_size)),
            "optimizer": f"{args.optimizer}, lr {args.learning_rate}, weight decay {args.weight_decay}",
            "loss": f"multi-similarity (alpha {args.ms_alpha}, beta {args.ms_beta}, base {args.ms_base}), "
            f"multi-similarity miner (epsilon {args.miner_epsilon})",
        }
        if args.loss == "triplet":
            training["batch"] = (
                f"{data_args.queries_per_batch} queries x (query, positive, {data_args.negatives_per_query} negatives)"
            )
            training["loss"] = (
                f"triplet margin (L2, margin {args.triplet_margin}); hardest of {data_args.negative_samples} "
                f"cached negatives, cache rebuilt every {data_args.cache_refresh_rate} queries"
            )
        url = push_model(
            model,
            self.eval_processor,
            args.push_to_hub,
            eval_results={results["dataset"]: recalls} if recalls else None,
            training=training,
            private=args.hub_private,
        )
        self.accelerator.print(f"pushed to {url}")


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: TrainArguments,
    model: torch.nn.Module | None = None,
    places: PlaceImages | None = None,
) -> TrainResult:
    """Train ``model_args.model`` (or the given ``model``) on ``data_args.train_dataset`` (or the
    given ``places``); see ``train.py --help`` for every argument."""
    return Trainer(model_args, data_args, args, model, places).train()
