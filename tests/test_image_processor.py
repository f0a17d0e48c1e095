"""The image processor of a model is the one saved with it, on every path (issue 11, item 3), and
its own call gives the pixels vprhub's engine gives, by its ``resize_rule``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from without_vprhub import run_without_vprhub

import vprhub
from vprhub import hub
from vprhub.embedding import processor_signature
from vprhub.modeling.image_processing import read_image_processor
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


# ---------------------------------------------------------------------------- the processor's own call
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, written out: not read from the code


def official_tensor_bilinear(images, height: int, width: int) -> torch.Tensor:
    """SelaVPR's and CricaVPR's evaluation transform in plain torch: ToTensor, Normalize, then a
    bilinear resize of the float tensor without antialiasing."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    batch = []
    for image in images:
        tensor = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
        normalised = ((tensor - mean) / std)[None]
        batch.append(F.interpolate(normalised, size=(height, width), mode="bilinear", align_corners=False, antialias=False)[0])
    return torch.stack(batch)


def test_tensor_bilinear_processor_call_is_the_official_transform():
    images = [photo(0), photo(1)]
    processor = vprhub.vpr_image_processor(56, 70, resize_rule="tensor_bilinear")
    assert isinstance(processor, vprhub.VPRImageProcessor)
    got = processor(images, return_tensors="pt")["pixel_values"]
    expected = official_tensor_bilinear(images, 56, 70)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    antialiased = vprhub.vpr_image_processor(56, 70)(images, return_tensors="pt")["pixel_values"]
    assert (antialiased - expected).abs().max() > 0.1  # the rule matters at this downscale


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_grey_and_alpha_images_are_read_as_their_rgb_conversion(mode):
    """Alpha is dropped (``convert("RGB")``, as vprhub's image reader does), not composited on white."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 120, 4), dtype=np.uint8), "RGBA").convert(mode)
    for rule in ("pil_antialias", "tensor_bilinear"):
        processor = vprhub.vpr_image_processor(56, 70, resize_rule=rule)
        got = processor(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(got, processor(image.convert("RGB"), return_tensors="pt")["pixel_values"])
        if rule == "tensor_bilinear":
            torch.testing.assert_close(got, official_tensor_bilinear([image], 56, 70), rtol=0, atol=1e-6)


def test_a_bad_resize_rule_is_refused_at_construction_and_call():
    with pytest.raises(ValueError, match=r"resize_rule must be one of \('pil_antialias', 'tensor_bilinear'\), got 'nearest'"):
        vprhub.vpr_image_processor(56, 56, resize_rule="nearest")
    with pytest.raises(ValueError, match="resize_rule must be one of"):
        vprhub.vpr_image_processor(56, 56)(photo(), resize_rule="bicubic")


@pytest.fixture
def selavpr_folder(tmp_path):
    """A SelaVPR folder with a 56 x 70 ``tensor_bilinear`` processor, as ``vprhub convert`` writes it."""
    torch.manual_seed(0)
    vprhub.build_model("selavpr").save_pretrained(tmp_path)
    vprhub.vpr_image_processor(56, 70, resize_rule="tensor_bilinear").save_pretrained(tmp_path)
    return tmp_path


def test_the_documented_model_call_equals_the_pipeline(selavpr_folder):
    """README's and the model card's ``model(**processor(images))`` gives the pipeline's descriptors."""
    images = [photo(0), photo(1).convert("L"), photo(2).convert("RGBA")]
    model = AutoModel.from_pretrained(selavpr_folder).eval()
    processor = AutoImageProcessor.from_pretrained(selavpr_folder)
    assert type(processor) is vprhub.VPRImageProcessor and processor.resize_rule == "tensor_bilinear"
    with torch.no_grad():
        documented = model(**processor(images, return_tensors="pt")).descriptors.numpy()
    recognizer = pipeline("place-recognition", model=str(selavpr_folder))
    np.testing.assert_allclose(np.stack(recognizer(images)), documented, rtol=1e-5, atol=1e-6)


def test_sixteen_bit_grey_images_are_scaled_as_the_pipeline_scales_them():
    """0..65535 grey levels map to 0..255 (rounded), not clipped at 255 as ``convert("RGB")`` would."""
    levels = np.random.default_rng(3).integers(0, 65536, (90, 120), dtype=np.uint16)
    image = Image.fromarray(levels)  # mode I;16
    scaled = ((levels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    for rule in ("pil_antialias", "tensor_bilinear"):
        processor = vprhub.vpr_image_processor(56, 70, resize_rule=rule)
        expected = processor(Image.fromarray(scaled).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], expected)


def test_saved_processor_loads_with_and_without_vprhub(selavpr_folder, tmp_path):
    """The folder holds the processor's code and ``auto_map``: remote code gives the same pixels."""
    saved = json.loads((selavpr_folder / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "VPRImageProcessor"
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_vpr.VPRImageProcessor"}
    assert saved["resize_rule"] == "tensor_bilinear" and saved["do_convert_rgb"] is True
    assert (selavpr_folder / "image_processing_vpr.py").is_file() and (selavpr_folder / "rgb.py").is_file()
    images = [photo(0), photo(1).convert("RGBA")]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    expected = official_tensor_bilinear(images, 56, 70)
    local = AutoImageProcessor.from_pretrained(selavpr_folder)
    # Pillow's pixels on every backend: asking for torchvision's gives the same class
    assert type(AutoImageProcessor.from_pretrained(selavpr_folder, backend="torchvision")) is vprhub.VPRImageProcessor
    torch.testing.assert_close(local(images, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=1e-6)
    script = """
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor

        folder, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        assert type(processor).__name__ == "VPRImageProcessor" and processor.resize_rule == "tensor_bilinear"
        images = [Image.open(f"{out}/{i}.png") for i in range(count)]
        torch.save(processor(images, return_tensors="pt")["pixel_values"], f"{out}/pixels.pt")
        """
    result = run_without_vprhub(script, [str(selavpr_folder), str(tmp_path), str(len(images))], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "pixels.pt", weights_only=True)
    torch.testing.assert_close(remote, expected, rtol=0, atol=1e-6)


def test_a_processor_saved_by_an_older_vprhub_keeps_its_rule(selavpr_folder):
    """transformers' stock ``ViTImageProcessor`` json with a ``resize_rule`` key is read as the VPR
    processor of the same settings, on vprhub's reader and the pipeline alike."""
    path = selavpr_folder / "preprocessor_config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("auto_map", "do_convert_rgb")}
    old["image_processor_type"] = "ViTImageProcessor"
    path.write_text(json.dumps(old))
    (selavpr_folder / "image_processing_vpr.py").unlink()
    images = [photo(0), photo(1)]
    processor = read_image_processor(str(selavpr_folder), "the processor")
    assert type(processor) is vprhub.VPRImageProcessor and processor.resize_rule == "tensor_bilinear"
    assert (processor.size.height, processor.size.width) == (56, 70)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, official_tensor_bilinear(images, 56, 70), rtol=0, atol=1e-6)
    model = AutoModel.from_pretrained(selavpr_folder).eval()
    recognizer = as_pipeline(model)
    assert type(recognizer.image_processor) is vprhub.VPRImageProcessor
    with torch.no_grad():
        documented = model(pixel_values=pixels).descriptors.numpy()
    np.testing.assert_allclose(np.stack(recognizer(images)), documented, rtol=1e-5, atol=1e-6)


def test_index_signature_is_unchanged_by_the_processor_class_and_saving(tmp_path):
    """An index records ``processor_signature``: the processor an older vprhub used (stock
    ``ViTImageProcessorPil`` + ``resize_rule``), the VPR one, and the VPR one saved and reloaded
    (with ``auto_map``) have the same, so indexes built before stay queryable."""
    processor = vprhub.vpr_image_processor(56, 70, resize_rule="tensor_bilinear")
    older = ViTImageProcessorPil(
        size={"height": 56, "width": 70}, image_mean=list(MEAN), image_std=list(STD), resize_rule="tensor_bilinear"
    )
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor_signature(processor) == processor_signature(older) == processor_signature(reloaded)
    assert processor_signature(processor)["resize_rule"] == "tensor_bilinear"
