"""Resumable checkpoints: ``accelerate`` state plus the loop's progress, written atomically, read
without running any pickled code."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import types
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open

from ..conversion.checkpoint import check_keys, check_shapes, unsafe_pickle_imports
from ..errors import short_error
from ..utils import atomic_write_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"  # accelerate's names
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "custom_checkpoint_0.pkl"  # the learning-rate scheduler, registered for checkpointing


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, holds pickled code, or belongs to another model."""

    def __init__(self, checkpoint: str | os.PathLike, name: str, reason: str):
        super().__init__(f"checkpoint {checkpoint} is damaged or of another model: {name}: {reason}")


def read_torch_file(checkpoint: Path, name: str) -> typing.Any:
    """The ``torch.save`` file ``name`` of ``checkpoint``: scanned for pickled code (refused, never run),
    then read with ``weights_only``, memory-mapped (a large optimizer state costs no copy)."""
    path = checkpoint / name
    if not path.is_file():
        raise CheckpointError(checkpoint, name, "missing")
    imports = unsafe_pickle_imports(path)
    if imports:
        shown = ", ".join(imports[:3]) + (" ..." if len(imports) > 3 else "")
        raise CheckpointError(checkpoint, name, f"holds pickled code (imports {shown}); refused without running it")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(checkpoint, name, "not a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # whatever torch raises on a damaged file
        raise CheckpointError(checkpoint, name, short_error(error)) from None


def check_model_file(checkpoint: Path, model: torch.nn.Module) -> None:
    """``model.safetensors`` holds exactly the tensors of ``model``, at its shapes (read from the header)."""
    try:
        with safe_open(checkpoint / MODEL_FILE, framework="pt") as handle:
            saved = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    except Exception as error:  # a missing file or safetensors' own error on a damaged header
        raise CheckpointError(checkpoint, MODEL_FILE, short_error(error)) from None
    expected = model.state_dict()
    try:
        check_keys(type(model).__name__, saved, expected)
        check_shapes(type(model).__name__, saved, expected)
    except ValueError as error:
        raise CheckpointError(checkpoint, MODEL_FILE, short_error(error, limit=400)) from None


@dataclass
class TrainerState:
    """Where the loop stands; saved in every checkpoint.

    ``batches_in_epoch`` counts the batches of ``epoch`` already consumed (on this process),
    which is what resuming skips.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_images: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_results: dict | None = None
    evaluations_without_improvement: int = 0
    last_eval_step: int | None = None
    log_history: list[dict] = field(default_factory=list)

    def save(self, folder: str | os.PathLike) -> None:
        with atomic_write_file(Path(folder) / STATE_FILE, "w") as handle:
            json.dump(dataclasses.asdict(self), handle, indent=1)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TrainerState:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a vprhub training checkpoint: no {STATE_FILE}")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(folder, STATE_FILE, f"not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise CheckpointError(folder, STATE_FILE, f"expected a JSON object, got {type(values).__name__}")
        fields = typing.get_type_hints(cls)
        for name, value in values.items():
            if name not in fields:
                raise CheckpointError(folder, STATE_FILE, f"unknown key {name!r} (expected {sorted(fields)})")
            kind = fields[name]
            if not isinstance(value, typing.get_origin(kind) if isinstance(kind, types.GenericAlias) else kind):
                raise CheckpointError(folder, STATE_FILE, f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return cls(**values)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(value: str, folder: str | os.PathLike) -> Path:
    """``value`` as a checkpoint folder; ``"latest"`` is the newest one in ``folder``."""
    if value == "latest":
        found = list_checkpoints(folder)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {folder}")
        return found[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator, folder: str | os.PathLike, state: TrainerState, total_limit: int = 0
) -> Path:
    """Save ``accelerator.save_state`` + ``state`` as ``folder/checkpoint-<step>``.

    Every process writes into a temporary sibling; the main process renames it into place once
    all are done, so a crash never leaves a half-written ``checkpoint-<step>``.  Only the
    ``total_limit`` newest checkpoints are kept (0: all).
    """
    folder = Path(folder)
    final = folder / f"checkpoint-{state.global_step}"
    tmp = folder / f".checkpoint-{state.global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit > 0:
            for old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
