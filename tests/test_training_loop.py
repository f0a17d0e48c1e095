"""The training loop end to end on tiny models: resume, outputs, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

import vprhub
from vprhub.modeling import mark_trainable
from vprhub.data import write_gsv_cities
from vprhub.evaluation import evaluate_model, load_test_set
from vprhub.training import DataArguments, ModelArguments, NonFiniteLossError, TrainArguments, main, train
from vprhub.training.optimization import build_optimizer, trainable_parameters

FAST_DATA = dict(
    train_dataset="synthetic",
    synthetic_places=12,
    synthetic_views=4,
    places_per_batch=3,
    images_per_place=4,
    image_size=[56, 56],
    eval_image_size=[56, 56],
    num_workers=0,
    eval_dataset="synthetic",
    synthetic_eval_places=6,
)
FAST_TRAIN = dict(learning_rate=1e-3, save_steps=0, disable_tqdm=True, report_to="none")


pytestmark = pytest.mark.usefixtures("isolated_training_run")


def _arguments(output_dir, model="salad", **overrides):
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    data = {**FAST_DATA, **{k: v for k, v in overrides.items() if k in data_fields}}
    args = {**FAST_TRAIN, **{k: v for k, v in overrides.items() if k not in data_fields}}
    return ModelArguments(model=model), DataArguments(**data), TrainArguments(output_dir=str(output_dir), **args)


def _steps(result) -> dict[int, dict]:
    return {entry["step"]: entry for entry in result.state.log_history if "loss" in entry}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    # 12 places / 3 per batch = 4 batches per epoch; RandAugment, dropout (SALAD) and two
    # DataLoader workers all draw randomness; the epoch boundary (evaluation) falls in between.
    options = dict(max_steps=6, save_steps=3, num_workers=2, rand_augment_ops=2)
    full = train(*_arguments(tmp_path / "full", **options))
    stopped = train(*_arguments(tmp_path / "split", **{**options, "max_steps": 3}))
    assert sorted(_steps(stopped)) == [1, 2, 3]
    assert (tmp_path / "split/checkpoints/checkpoint-3/trainer_state.json").is_file()
    resumed = train(*_arguments(tmp_path / "split", **options, resume_from_checkpoint="latest"))

    full_steps, resumed_steps = _steps(full), _steps(resumed)
    assert sorted(resumed_steps) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "batch_acc", "lr", "epoch"):
            assert resumed_steps[step][key] == pytest.approx(full_steps[step][key], abs=1e-6, rel=0), (step, key)
    assert len({round(full_steps[s]["loss"], 6) for s in range(1, 7)}) == 6  # the losses do move
    full_weights = load_file(tmp_path / "full/model.safetensors")
    resumed_weights = load_file(tmp_path / "split/model.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0)
    assert resumed.eval_results == full.eval_results
    leftovers = [p.name for p in (tmp_path / "split/checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and full.last_checkpoint.name == "checkpoint-6"


def test_evaluation_only_writes_results_and_a_loadable_model(tmp_path):
    result = train(*_arguments(tmp_path, model="cricavpr", max_steps=0, eval_batch_size=4))
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results == result.eval_results
    assert results["dataset"] == "synthetic(seed=10000)" and (results["num_database"], results["num_queries"]) == (6, 6)
    assert (results["train_images"], results["train_places"], results["global_step"]) == (48, 12, 0)
    assert all(0.0 <= results[f"recall@{k}"] <= 1.0 for k in (1, 5, 10)) and results["recall@10"] == 1.0

    model = AutoModel.from_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 56, "width": 56}
    # The evaluation module, run independently on the saved model, agrees.
    test_set = load_test_set(next(tmp_path.glob("synthetic-eval-*")) / "images" / "test")
    independent = evaluate_model(model, processor, test_set, batch_size=4, progress=False)
    assert [independent[f"recall@{k}"] for k in (1, 5, 10)] == [results[f"recall@{k}"] for k in (1, 5, 10)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = vprhub.build_model("salad")
    calls = {"n": 0}

    def poison(module, inputs, output):  # the third training forward pass
        calls["n"] += module.training
        if module.training and calls["n"] == 3:
            output.descriptors = output.descriptors * float("nan")
        return output

    model.register_forward_hook(poison)
    model_args, data_args, args = _arguments(tmp_path, max_steps=6, save_steps=2, eval_dataset="none")
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3 .*last good checkpoint: .*checkpoint-2"):
        train(model_args, data_args, args, model=model)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "eval_results.json").exists()


def test_small_places_and_corrupt_images_are_counted_and_the_run_continues(tmp_path):
    root = write_gsv_cities(tmp_path / "gsv", cities={"Alpha": 4}, views_per_place=4, image_size=56)
    (root / "Images" / "Alpha").joinpath(sorted((root / "Images" / "Alpha").iterdir())[5].name).write_bytes(b"\0" * 50)
    csv = root / "Dataframes" / "Alpha.csv"
    row = "9,2020,1,0,Alpha,45.5,9.5,lonely{}\n"
    csv.write_text(csv.read_text() + row.format(0) + row.format(1))  # a place with 2 images
    for view in range(2):
        Image.new("RGB", (56, 56)).save(
            root / "Images" / "Alpha" / f"Alpha_0000009_2020_01_000_45.5_9.5_lonely{view}.jpg"
        )
    # 4 places x 4 images, 2 places per batch: one epoch of 2 steps reads every image once.
    result = train(*_arguments(tmp_path / "run", train_dataset=str(root), places_per_batch=2, max_steps=2))
    assert [result.eval_results[k] for k in ("train_places", "dropped_places", "dropped_images", "skipped_images")] == [
        4,
        1,
        2,
        1,
    ]
    assert len(_steps(result)) == 2 and all(np.isfinite(e["loss"]) for e in _steps(result).values())


def test_unreadable_images_are_named_once_and_no_readable_image_is_an_error(tmp_path, caplog):
    root = write_gsv_cities(tmp_path / "gsv", cities={"Alpha": 4}, views_per_place=4, image_size=56)
    images = sorted((root / "Images" / "Alpha").iterdir())
    for image in images[::2]:
        image.unlink()
    # 4 places, 2 per batch: 2 steps per epoch; 3 epochs read every missing file 3 times.
    result = train(*_arguments(tmp_path / "some", train_dataset=str(root), places_per_batch=2, max_steps=6))
    assert result.state.global_step == 6 and result.state.skipped_images == 3 * 8
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sorted(m.split("(image file not found: ")[1].rstrip(")") for m in named) == [str(p) for p in images[::2]]

    for image in images[1::2]:
        image.unlink()
    with pytest.raises(ValueError, match=r"no training image could be read in epoch 0 \(16 unreadable, e\.g\. "):
        train(*_arguments(tmp_path / "none", train_dataset=str(root), places_per_batch=2, num_train_epochs=1))
    assert not (tmp_path / "none/model.safetensors").exists()


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    train(*_arguments(tmp_path, max_steps=1, save_steps=1, eval_dataset="none"))
    argv = ["--model", "salad", "--output_dir", str(tmp_path), "--max_steps", "1", "--num_workers", "0"]
    assert main(argv) == 1
    assert "already holds checkpoints; pass --resume_from_checkpoint latest" in capsys.readouterr().err
    assert main(["--model", "vlad", "--output_dir", str(tmp_path)]) == 1
    assert "unknown model 'vlad'" in capsys.readouterr().err
    result = train(*_arguments(tmp_path, max_steps=1, save_steps=1, eval_dataset="none", overwrite_output_dir=True))
    assert result.state.global_step == 1


def test_an_output_dir_blocked_by_a_file_is_one_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for output_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["--model", "salad", "--output_dir", str(output_dir), "--max_steps", "1"]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: --output_dir {output_dir}: {tmp_path / 'afile'} is a file, not a folder"]
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_final_save_killed_midway_leaves_nothing_after_the_next_run(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # the pid of a process that has ended, as a killed run's would be
    stale = tmp_path / f".final-save.{dead}.x1y2.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".final-save.{os.getpid()}.a1b2.tmp"  # a run that still writes: left alone
    live.mkdir()
    train(*_arguments(tmp_path, max_steps=1, eval_dataset="none"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]
    assert (tmp_path / "model.safetensors").stat().st_size > 1000


def test_a_trained_model_is_not_replaced_without_overwrite(tmp_path, capsys):
    train(*_arguments(tmp_path, max_steps=1, save_steps=0, eval_dataset="none"))
    weights = (tmp_path / "model.safetensors").read_bytes()
    argv = ["--model", "salad", "--output_dir", str(tmp_path), "--max_steps", "1", "--num_workers", "0"]
    assert main(argv) == 1
    assert f"{tmp_path} already holds a trained model; pass --overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == weights


def test_gradient_checkpointing_and_accumulation(tmp_path):
    plain = train(*_arguments(tmp_path / "a", max_steps=1, eval_dataset="none"))
    checkpointed = train(*_arguments(tmp_path / "b", max_steps=1, eval_dataset="none", gradient_checkpointing=True))
    assert _steps(checkpointed)[1]["loss"] == pytest.approx(_steps(plain)[1]["loss"], abs=1e-6)
    accumulated = train(*_arguments(tmp_path / "c", max_steps=1, eval_dataset="none", gradient_accumulation_steps=2))
    assert accumulated.state.batches_in_epoch == 2 and accumulated.state.global_step == 1


def test_bf16_mixed_precision_trains(tmp_path):
    result = train(*_arguments(tmp_path, max_steps=2, eval_dataset="none", mixed_precision="bf16"))
    assert all(np.isfinite(entry["loss"]) for entry in _steps(result).values())


def test_fast_path_options_train_like_the_plain_path(tmp_path, capsys):
    """Fused optimizer + SDPA (the defaults) follow the unfused, eager-attention run's losses;
    torch.compile (its eager backend: the same kernels) gives the same weights under the same names."""
    common = dict(max_steps=3, eval_dataset="none")
    plain = train(*_arguments(tmp_path / "plain", **common, fused_optimizer=False, attn_implementation="eager"))
    fast = train(*_arguments(tmp_path / "fast", **common))
    compiled = train(*_arguments(tmp_path / "compiled", **common, torch_compile=True, torch_compile_backend="eager"))
    assert "sdpa attention, fused adamw, torch.compile (eager)" in capsys.readouterr().out
    for step, entry in _steps(plain).items():
        assert _steps(fast)[step]["loss"] == pytest.approx(entry["loss"], abs=1e-5), step
        assert _steps(compiled)[step]["loss"] == pytest.approx(_steps(fast)[step]["loss"], abs=1e-6), step
    fast_weights = load_file(tmp_path / "fast/model.safetensors")
    compiled_weights = load_file(tmp_path / "compiled/model.safetensors")
    assert compiled_weights.keys() == fast_weights.keys()
    for name, tensor in fast_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, atol=1e-6, rtol=0)


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = vprhub.build_model("selavpr")
    mark_trainable(model)
    optimizer = build_optimizer(trainable_parameters(model), _arguments("unused")[2])
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(id(p) not in in_optimizer for p in model.parameters() if not p.requires_grad)
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no trainable parameter"):
        trainable_parameters(torch.nn.Linear(2, 2).requires_grad_(False))


def test_selavpr_local_loss_trains_the_local_head(tmp_path):
    torch.manual_seed(0)
    model = vprhub.build_model("selavpr")
    before = {name: p.detach().clone() for name, p in model.local_head.named_parameters()}
    train(*_arguments(tmp_path, model="selavpr", max_steps=1, eval_dataset="none", local_loss_weight=1.0), model=model)
    assert all(not torch.equal(p, before[name]) for name, p in model.local_head.named_parameters())
    frozen = vprhub.build_model("selavpr")
    train(*_arguments(tmp_path / "global", model="selavpr", max_steps=1, eval_dataset="none"), model=frozen)
    assert not any(p.requires_grad for p in frozen.local_head.parameters())
    with pytest.raises(ValueError, match="--local_loss_weight needs a model with local features"):
        train(*_arguments(tmp_path / "salad", max_steps=1, eval_dataset="none", local_loss_weight=1.0))


def test_push_to_hub_sends_the_trained_model_and_its_results(hub_server, tmp_path):
    result = train(*_arguments(tmp_path, max_steps=1, push_to_hub="org/salad-synthetic"))
    files = hub_server.commits("org/salad-synthetic")[0].files
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    card = files["README.md"].data.decode()
    assert "synthetic(seed=0)" in card and f"{100 * result.eval_results['recall@1']:.1f}" in card
    pulled, saved = AutoModel.from_pretrained("org/salad-synthetic"), AutoModel.from_pretrained(tmp_path)
    assert all(torch.equal(pulled.state_dict()[name], tensor) for name, tensor in saved.state_dict().items())


def test_a_step_that_breaks_the_model_exits_1_and_saves_nothing(tmp_path, capsys):
    # Adam at 1e30 keeps the weights finite (about 1e30) but the descriptors overflow to NaN.
    argv = ["--model", "salad", "--output_dir", str(tmp_path), "--learning_rate", "1e30", "--max_steps", "1"]
    argv += ["--eval_dataset", "none", "--image_size", "56", "56", "--places_per_batch", "3", "--num_workers", "0"]
    argv += ["--synthetic_places", "6", "--disable_tqdm", "true", "--report_to", "none"]
    assert main(argv) == 1
    assert "the model became non-finite at step 1 (the descriptors of the last batch)" in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoints").exists()


def test_resume_from_another_runs_checkpoint_keeps_its_best_model(tmp_path):
    # 12 places / 3 per batch: the epoch ends (evaluation, best model) at step 4, then the checkpoint.
    first = train(*_arguments(tmp_path / "first", max_steps=4, save_steps=4))
    checkpoint = tmp_path / "first/checkpoints/checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["best_step"] == 4
    state["best_metric"] = 2.0  # unbeatable: the resumed run must end by loading this best model
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    resumed = train(*_arguments(tmp_path / "second", max_steps=6, resume_from_checkpoint=str(checkpoint)))
    assert resumed.state.global_step == 6 and resumed.state.best_step == 4
    best = load_file(tmp_path / "first/checkpoints/best-model/model.safetensors")
    final = load_file(tmp_path / "second/model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert resumed.eval_results["recall@1"] == first.eval_results["recall@1"]


def test_unreadable_rng_state_is_an_error_unless_accepted(tmp_path, capsys, caplog):
    train(*_arguments(tmp_path, max_steps=1, save_steps=1, eval_dataset="none"))
    (tmp_path / "checkpoints/checkpoint-1/random_states_0.pkl").write_bytes(b"not a pickle")
    argv = ["--model", "salad", "--output_dir", str(tmp_path), "--max_steps", "2", "--num_workers", "0"]
    argv += ["--image_size", "56", "56", "--places_per_batch", "3", "--synthetic_places", "12"]
    argv += ["--eval_dataset", "none", "--resume_from_checkpoint", "latest", "--disable_tqdm", "true"]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "random_states_0.pkl: unreadable random-number state" in error and "--resume_without_rng_state" in error
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1  # nothing trained
    assert main([*argv, "--resume_without_rng_state", "true"]) == 0
    assert "continuing with fresh random states" in caplog.text
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


class _CreatesFile:
    """Unpickled, it would create ``path`` (the proof that a pickle from a checkpoint ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _resume_argv(output_dir, model="salad") -> list[str]:
    argv = ["--model", model, "--output_dir", str(output_dir), "--max_steps", "2", "--num_workers", "0"]
    argv += ["--image_size", "56", "56", "--places_per_batch", "3", "--synthetic_places", "12"]
    return argv + ["--eval_dataset", "none", "--resume_from_checkpoint", "latest", "--disable_tqdm", "true"]


def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    train(*_arguments(tmp_path / "run", max_steps=1, save_steps=1, eval_dataset="none"))
    marker = tmp_path / "payload-ran"
    payloads = {
        "plain pickle": lambda path: path.write_bytes(pickle.dumps(_CreatesFile(marker))),
        "torch.save": lambda path: torch.save({"state": _CreatesFile(marker)}, path),
    }
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        for how, write in payloads.items():
            output_dir = tmp_path / f"{name}-{how}"
            shutil.copytree(tmp_path / "run", output_dir)
            write(output_dir / "checkpoints/checkpoint-1" / name)
            assert main(_resume_argv(output_dir)) == 1, (name, how)
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in err, (name, how, err)
            if name == "random_states_0.pkl":  # refused by accelerate's weights-only reader
                assert f"{name}: unreadable random-number state (UnpicklingError: Weights only" in errors[0]
            else:
                assert f"{name}: holds pickled code (imports io.open); refused without running it" in errors[0]
            assert not marker.exists(), (name, how)
            assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1


def test_a_damaged_or_foreign_checkpoint_is_one_error_naming_the_file(tmp_path, capsys):
    train(*_arguments(tmp_path / "run", max_steps=1, save_steps=1, eval_dataset="none"))
    state = json.loads((tmp_path / "run/checkpoints/checkpoint-1/trainer_state.json").read_text())
    weights = (tmp_path / "run/checkpoints/checkpoint-1/model.safetensors").read_bytes()
    damages = {
        "broken json": ("trainer_state.json", "{\"global_step\": 1,", "trainer_state.json: not valid JSON"),
        "extra key": ("trainer_state.json", json.dumps({**state, "x": 1}), "trainer_state.json: unknown key 'x'"),
        "wrong type": (
            "trainer_state.json",
            json.dumps({**state, "global_step": "two"}),
            "trainer_state.json: global_step must be int, got 'two'",
        ),
        "truncated model": ("model.safetensors", weights[:100], "model.safetensors: Error while deserializing header"),
        "truncated scheduler": ("custom_checkpoint_0.pkl", b"PK\x03\x04", "custom_checkpoint_0.pkl: not a file written"),
    }
    for label, (name, content, expected) in damages.items():
        output_dir = tmp_path / label.replace(" ", "-")
        shutil.copytree(tmp_path / "run", output_dir)
        path = output_dir / "checkpoints/checkpoint-1" / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        assert main(_resume_argv(output_dir)) == 1, label
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is damaged or of another model: " + expected in errors[0], (label, errors)
    assert main(_resume_argv(tmp_path / "run", model="cricavpr")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors: not a CricaVPRModel checkpoint: missing keys [" in errors[0]
    assert len(errors[0]) < 1000


def test_init_from_starts_from_a_saved_model_and_refuses_others(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    saved = vprhub.build_model("selavpr")
    for name, parameter in saved.named_parameters():
        if "up_proj" in name:  # adapters that change the descriptors, unlike fresh zero ones
            torch.nn.init.normal_(parameter, std=0.1)
    saved.save_pretrained(tmp_path / "msls")
    first = {}

    def load_and_watch(source, model_type):
        model = load_trained_model(source, model_type)

        def keep_first(module, args, kwargs, output):
            first.setdefault("pixel_values", kwargs.get("pixel_values", args[0] if args else None).detach().clone())
            first.setdefault("descriptors", output.descriptors.detach().clone())

        model.register_forward_hook(keep_first, with_kwargs=True)
        return model

    load_trained_model = vprhub.training.loop._load_trained_model
    monkeypatch.setattr(vprhub.training.loop, "_load_trained_model", load_and_watch)
    model_args, data_args, args = _arguments(tmp_path / "pitts", model="selavpr", max_steps=1, eval_dataset="none")
    train(dataclasses.replace(model_args, init_from=str(tmp_path / "msls")), data_args, args)
    with torch.no_grad():
        expected = saved.train()(pixel_values=first["pixel_values"]).descriptors
        fresh = vprhub.build_model("selavpr").train()(pixel_values=first["pixel_values"]).descriptors
    torch.testing.assert_close(first["descriptors"], expected, atol=1e-5, rtol=0)
    assert (first["descriptors"] - fresh).abs().max() > 1e-2
    trained = AutoModel.from_pretrained(tmp_path / "pitts")
    assert not torch.equal(trained.state_dict()["backbone.encoder.layer.1.adapters.parallel.up_proj.weight"],
                           saved.state_dict()["backbone.encoder.layer.1.adapters.parallel.up_proj.weight"])

    common = ["--train_dataset", "synthetic", "--eval_dataset", "none", "--max_steps", "1", "--report_to", "none"]
    assert main(["--model", "salad", "--init_from", str(tmp_path / "msls"), "--output_dir", str(tmp_path / "a"), *common]) == 1
    assert f"--init_from {tmp_path / 'msls'} is a 'selavpr' model, not the --model 'salad'" in capsys.readouterr().err
    missing = tmp_path / "no-such-run"
    assert main(["--model", "selavpr", "--init_from", str(missing), "--output_dir", str(tmp_path / "b"), *common]) == 1
    assert f"--init_from {missing} not found: no such file or folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--init_from brings its own backbone"):
        ModelArguments(model="selavpr", backbone="facebook/dinov2-large", init_from=str(tmp_path / "msls"))
