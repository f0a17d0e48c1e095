"""`vprhub convert`: containers, inferred architecture, and every way a checkpoint can be wrong."""

import json

import pytest
import torch

import vprhub
from vprhub.cli import main as vprhub_main
from vprhub.conversion import convert_checkpoint
from parity import load_manifest, regenerate_weights


@pytest.fixture(scope="module")
def official_salad():
    return regenerate_weights(load_manifest("salad"))


def test_lightning_container_is_accepted(official_salad, tmp_path):
    checkpoint = tmp_path / "salad.ckpt"
    torch.save({"state_dict": official_salad, "epoch": 3}, checkpoint)
    model = convert_checkpoint("salad", checkpoint, tmp_path / "out")
    assert isinstance(model, vprhub.SaladModel)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_salad.py"} <= set(files)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]["AutoModel"].endswith("SaladModel")


def test_heads_can_be_given(official_salad, tmp_path):
    checkpoint = tmp_path / "salad.ckpt"
    torch.save(official_salad, checkpoint)
    model = convert_checkpoint("salad", checkpoint, tmp_path / "out", num_attention_heads=3)
    assert model.config.backbone_config.num_attention_heads == 3


def test_missing_and_unexpected_keys_are_listed(official_salad, tmp_path, capsys):
    broken = dict(official_salad)
    del broken["aggregator.token_features.0.bias"]
    broken["aggregator.extra.weight"] = torch.zeros(1)
    checkpoint = tmp_path / "broken.ckpt"
    torch.save(broken, checkpoint)
    assert vprhub_main(["convert", "salad", str(checkpoint), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "aggregator.token_features.0.bias" in error and "aggregator.extra.weight" in error
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    other = {"module.backbone.cls_token": torch.zeros(1, 1, 64), "module.aggregation.1.p": torch.ones(1)}
    checkpoint = tmp_path / "selavpr.pth"
    torch.save({"model_state_dict": other}, checkpoint)
    assert vprhub_main(["convert", "salad", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "not a SALAD checkpoint" in capsys.readouterr().err


def test_truncated_file_is_refused(official_salad, tmp_path, capsys):
    checkpoint = tmp_path / "salad.ckpt"
    torch.save(official_salad, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    assert vprhub_main(["convert", "salad", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_missing_checkpoint_file(tmp_path, capsys):
    assert vprhub_main(["convert", "salad", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_non_empty_out_dir_needs_overwrite(official_salad, tmp_path, capsys):
    checkpoint = tmp_path / "salad.ckpt"
    torch.save(official_salad, checkpoint)
    out = tmp_path / "out"
    assert vprhub_main(["convert", "salad", str(checkpoint), str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert vprhub_main(["convert", "salad", str(checkpoint), str(out), "--num-heads", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    assert vprhub_main(["convert", "salad", str(checkpoint), str(out), "--overwrite", "--num-heads", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["backbone_config"]["num_attention_heads"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folders left behind"


def test_overwrite_never_replaces_other_folders(official_salad, tmp_path, capsys):
    """--overwrite replaces an earlier conversion only: not a user's folder, not the checkpoint's."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    checkpoint = mine / "salad.ckpt"
    torch.save(official_salad, checkpoint)
    assert vprhub_main(["convert", "salad", str(checkpoint), str(mine), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("other")
    assert vprhub_main(["convert", "salad", str(checkpoint), str(other), "--overwrite"]) == 2
    assert "not a vprhub model folder" in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "mine" and checkpoint.is_file()
    assert (other / "keep.txt").read_text() == "other"


@pytest.mark.parametrize(
    ("heads", "message"),
    [("-4", "must be positive, got -4"), ("0", "must be positive, got 0"), ("5", "5 attention heads do not divide")],
)
def test_head_count_is_checked_against_the_width(official_salad, tmp_path, capsys, heads, message):
    checkpoint = tmp_path / "salad.ckpt"
    torch.save(official_salad, checkpoint)
    assert vprhub_main(["convert", "salad", str(checkpoint), str(tmp_path / "out"), "--num-heads", heads]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_unknown_model_name(tmp_path):
    with pytest.raises(SystemExit):
        vprhub_main(["convert", "netvlad", "x.ckpt", str(tmp_path / "out")])
