"""Two CPU processes (torchrun) against one: the same epochs, optimiser steps and learning-rate curve.

16 synthetic places x 2 images; one process takes 4 places per batch, each of two processes 2
(with the loss over the gathered batch), so both runs have a global batch of 8 images and an
epoch of 4 optimiser steps. LinearLR decays over 6 steps, so stepping it once per process (or
counting an epoch per process) would show in the curve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import vprhub

SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from vprhub.training import DataArguments, ModelArguments, TrainArguments, train

torch.set_num_threads(1)
output_dir, places_per_batch = sys.argv[1], int(sys.argv[2])
data = DataArguments(
    train_dataset="synthetic", synthetic_places=16, synthetic_views=2, places_per_batch=places_per_batch,
    images_per_place=2, image_size=[56, 56], eval_dataset="none", num_workers=0, rand_augment_ops=0,
)
args = TrainArguments(
    output_dir=output_dir, num_train_epochs=2, learning_rate=1e-3, lr_scheduler="linear", lr_decay_steps=6,
    gather_across_processes=True, save_steps=0, disable_tqdm=True, report_to="none",
)
trainer_result = train(ModelArguments(model="cricavpr"), data, args)
if PartialState().is_main_process:
    state = trainer_result.state
    curve = [entry["lr"] for entry in state.log_history if "lr" in entry]
    with open(output_dir + "/curve.json", "w") as handle:
        json.dump({"steps": state.global_step, "epoch": state.epoch, "lr": curve}, handle)
"""


def _run(tmp_path: Path, command: list[str], name: str, places_per_batch: int) -> tuple[dict, str]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    src = str(Path(vprhub.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / name
    done = subprocess.run(
        [*command, str(script), str(out), str(places_per_batch)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "curve.json").read_text()), done.stdout


def test_two_processes_train_the_same_epochs_and_learning_rate_curve_as_one(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, printed = _run(tmp_path, torchrun, "two", places_per_batch=2)
    one, _ = _run(tmp_path, [sys.executable], "one", places_per_batch=4)
    assert "global batch: 2 processes x 2 places x 2 images = 8 images per optimiser step" in printed
    assert "gathered); 4 optimiser steps per epoch, 8 in all" in printed
    # Two epochs of 16 places x 2 images in global batches of 8: 4 optimiser steps each.
    assert (two["steps"], two["epoch"]) == (one["steps"], one["epoch"]) == (8, 2)
    expected = [1e-3 * (1 - 0.8 * min(step, 6) / 6) for step in range(1, 9)]  # LinearLR(1 -> 0.2 over 6)
    assert two["lr"] == one["lr"]
    assert [round(lr, 12) for lr in one["lr"]] == [round(lr, 12) for lr in expected]
