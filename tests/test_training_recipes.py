"""The recipes in training/ against the README tables that cite the official code for every value,
and the evaluation preprocessing rule of each converted model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor

from vprhub.conversion import OFFICIAL_RESIZE_RULES
from vprhub.modeling.image_processing import vpr_image_processor
from vprhub.training import parse_args

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \| (.+) \|$")


def _readme_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """``{heading: {first column: (second column, source)}}`` of the README's ``####`` tables."""
    tables, heading = {}, None
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("#### "):
            heading = line[5:].strip().strip("`")
            tables[heading] = {}
        elif line.startswith("#"):
            heading = None
        elif heading and (match := ROW.match(line)):
            tables[heading][match.group(1)] = (match.group(2), match.group(3).strip())
    return tables


@pytest.mark.parametrize(
    "recipe",
    ["training/salad.yaml", "training/cricavpr.yaml", "training/selavpr.yaml", "training/selavpr-pitts30k.yaml"],
)
def test_every_recipe_setting_is_in_the_readme_table_with_its_official_source(recipe):
    table = _readme_tables()[recipe]
    values = yaml.safe_load((REPO / recipe).read_text(encoding="utf-8"))
    assert sorted(table) == sorted(values)
    parsed = _recipe(Path(recipe).name)
    for key, (text, source) in table.items():
        assert len(source) > 10, (key, source)
        documented = text if isinstance(parsed[key], str) else yaml.safe_load(text)
        assert parsed[key] == documented, (recipe, key)
        assert parsed[key] == values[key], (recipe, key)


def _recipe(name: str) -> dict:
    return {k: v for group in parse_args(["--config", str(REPO / "training" / name)]) for k, v in vars(group).items()}


def test_recipes_reproduce_the_official_batches():
    salad = _recipe("salad.yaml")
    assert (salad["image_size"], salad["eval_image_size"]) == ([224, 224], [224, 224])  # validation at 224
    crica = _recipe("cricavpr.yaml")
    # Two processes of 36 x 4 with the loss over the gathered 288 images; 8-image evaluation passes.
    assert (crica["places_per_batch"], crica["gather_across_processes"], crica["eval_batch_size"]) == (36, True, 8)
    sela = _recipe("selavpr.yaml")
    assert (sela["loss"], sela["eval_rerank_num"], sela["metric_for_best_model"]) == ("triplet", 100, "recall@5")
    assert _recipe("selavpr-gsv-cities.yaml")["loss"] == "multi_similarity"
    # The Pitts30k stage starts from the MSLS stage's output and changes only the data and epoch size.
    pitts = _recipe("selavpr-pitts30k.yaml")
    assert (pitts["init_from"], sela["init_from"]) == (sela["output_dir"], None)
    changed = {key for key in sela if pitts[key] != sela[key]}
    assert changed == {"init_from", "backbone", "train_dataset", "eval_dataset", "queries_per_epoch", "output_dir"}
    assert (pitts["queries_per_epoch"], sela["queries_per_epoch"]) == (5000, 30000)


def test_converters_write_the_official_evaluation_rule_the_readme_names():
    rows = {}
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Evaluation preprocessing of each model") :]
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if match := re.match(r"^\| (\w+) \| `(\w+)` \|", line):
            rows[match.group(1).lower()] = match.group(2)
    assert rows == OFFICIAL_RESIZE_RULES


def test_tensor_rule_normalises_then_resizes_without_antialiasing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    processor = vpr_image_processor(2, 2, resize_rule="tensor_bilinear")
    mean, std = np.asarray(processor.image_mean), np.asarray(processor.image_std)
    normalised = (pixels / 255.0 - mean) / std
    # Halving with bilinear, align_corners=False and no antialiasing samples between pixel pairs:
    # every output pixel is the mean of a 2x2 block.
    expected = normalised.reshape(2, 2, 2, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    got = processor([image], return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    antialiased = vpr_image_processor(2, 2)([image], return_tensors="pt")["pixel_values"][0].numpy()
    assert np.abs(antialiased - expected).max() > 0.05  # Pillow's filter reaches beyond the block
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(reloaded([image], return_tensors="pt")["pixel_values"], processor([image], return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="resize_rule must be one of"):
        vpr_image_processor(2, 2, resize_rule="nearest")
