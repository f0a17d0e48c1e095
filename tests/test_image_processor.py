"""The image processor of a model is the one saved with it, on every path (issue 11, item 3)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, pipeline

import vprhub
from vprhub import hub
from vprhub.pipelines import as_pipeline, build_index

CONVERSION = {"checkpoint": "official.ckpt"}


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    """A SALAD folder whose saved processor (70 x 84) differs from config.image_size (224 x 224)."""
    torch.manual_seed(0)
    vprhub.build_model("salad").save_pretrained(tmp_path)
    vprhub.vpr_image_processor(70, 84).save_pretrained(tmp_path)
    return tmp_path


def expected_descriptor(model, height: int, width: int) -> np.ndarray:
    pixels = vprhub.vpr_image_processor(height, width)(photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).descriptors[0].numpy()


@pytest.mark.parametrize("make", ["pipeline", "as_pipeline"])
def test_a_loaded_model_object_keeps_its_saved_processor(folder, make):
    model = AutoModel.from_pretrained(folder).eval()
    pipe = pipeline("place-recognition", model=model) if make == "pipeline" else as_pipeline(model)
    assert (pipe.image_processor.size.height, pipe.image_processor.size.width) == (70, 84)
    np.testing.assert_allclose(pipe(photo()), expected_descriptor(model, 70, 84), rtol=0, atol=1e-6)


def test_index_build_uses_the_saved_processor(folder):
    """The indexed descriptor is the one of the 70 x 84 input (a 224 x 224 one is ~0.07 away)."""
    model = AutoModel.from_pretrained(folder).eval()
    index = build_index(model, [photo()], progress=False)
    scores, ids = index.search(expected_descriptor(model, 70, 84)[None], top_k=1)
    assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_an_unreadable_processor_is_an_error_naming_the_file(folder):
    (folder / "preprocessor_config.json").write_text("{not json")
    model = AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"cannot read the image processor .*preprocessor_config\.json"):
        as_pipeline(model)


def test_the_default_is_used_only_without_a_saved_processor_and_is_logged(folder, caplog):
    (folder / "preprocessor_config.json").unlink()
    model = AutoModel.from_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="vprhub"):
        pipe = as_pipeline(model)
    assert (pipe.image_processor.size.height, pipe.image_processor.size.width) == (224, 224)
    assert "has no preprocessor_config.json: using the VPR image processor at config.image_size 224x224" in caplog.text


def test_a_model_loaded_by_hub_id_gets_the_processor_of_its_revision(hub_server):
    torch.manual_seed(0)
    model = vprhub.build_model("salad").eval()
    repo = "org/salad-processor"
    hub.push_model(model, vprhub.vpr_image_processor(70, 84), repo, conversion=CONVERSION)
    first = hub_server.commits(repo)[0].sha
    hub.push_model(model, vprhub.vpr_image_processor(56, 56), repo, conversion=CONVERSION)
    pinned = AutoModel.from_pretrained(repo, revision=first)
    latest = AutoModel.from_pretrained(repo)
    for loaded, size in ((pinned, (70, 84)), (latest, (56, 56))):
        pipe = as_pipeline(loaded)
        assert (pipe.image_processor.size.height, pipe.image_processor.size.width) == size
