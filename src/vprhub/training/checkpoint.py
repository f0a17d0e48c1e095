"""Resumable checkpoints: ``accelerate`` state plus the loop's progress, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from ..utils import atomic_write_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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
        return cls(**json.loads(path.read_text(encoding="utf-8")))


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
