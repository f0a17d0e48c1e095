"""The one image opener: EXIF, 16-bit, reduced JPEG decoding, bombs, folder listing (issue 16: 4, 5, 8, 19)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vprhub
from vprhub.evaluation import extract_descriptors
from vprhub.image_io import UnreadableImageError, decode_resized, list_image_files, open_image
from vprhub.pipelines import PlaceRecognitionPipeline, build_index

EXIF_ORIENTATION = 0x0112


def asymmetric(height: int = 40, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_exif_orientation_is_applied_everywhere(tmp_path):
    """Issue 16 item 4: a photo stored sideways with an orientation tag gives the upright
    picture's descriptor in the pipeline, index building and evaluation alike."""
    upright = asymmetric()
    stored = np.rot90(upright, k=1)  # orientation 6 means: rotate 90 degrees clockwise to display
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "sideways.png"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(open_image(path)), upright)

    torch.manual_seed(0)
    model = vprhub.build_model("salad", image_size=[56, 56])
    pipe = PlaceRecognitionPipeline(model=model)
    expected = pipe(upright)
    np.testing.assert_allclose(pipe(str(path)), expected, atol=1e-6)
    index = build_index(pipe, [path], progress=False, num_workers=0)
    assert index.search(expected, 1)[0][0, 0] == pytest.approx(1.0, abs=1e-5)
    evaluated = extract_descriptors(model, pipe.image_processor, [path], progress=False)
    np.testing.assert_allclose(evaluated[0], expected, atol=1e-6)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """Issue 16 item 5: a full 16-bit ramp keeps its grey levels (mean 127.5, not 254.5)."""
    ramp = np.linspace(0, 65535, 256 * 64).round().astype(np.uint16).reshape(64, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(open_image(path))
    expected = np.round(ramp / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 2], expected)
    assert abs(pixels.mean() - 127.5) < 0.5
    np.testing.assert_array_equal(np.asarray(open_image(ramp)), pixels)  # uint16 arrays alike


def test_big_jpegs_decode_at_reduced_size(tmp_path):
    """Issue 16 item 19: memory follows the model's input, not the photo (DCT-domain draft)."""
    path = tmp_path / "big.jpg"
    small = np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4500), Image.BICUBIC).save(path, quality=90)
    image = open_image(path, size=(322, 322))
    assert image.size == (1500, 1125)  # 1/4 of 6000 x 4500 (still >= 2 x 322): 5 MB decoded, not 81 MB
    assert open_image(path).size == (6000, 4500)  # no size asked: full decode
    reduced = decode_resized(path, (322, 322)).astype(float)
    full = np.asarray(open_image(path).resize((322, 322), Image.BILINEAR)).astype(float)
    assert np.abs(reduced - full).mean() < 1.0  # the same picture, within a grey level on average
    modest = tmp_path / "modest.jpg"
    Image.fromarray(small).resize((640, 480)).save(modest)
    assert open_image(modest, size=(322, 322)).size == (640, 480)  # never below twice the model size


def test_bombs_and_bad_inputs_are_named(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)
    with pytest.raises(UnreadableImageError, match="bomb.png: .*decompression bomb"):
        open_image(bomb)
    with pytest.raises(UnreadableImageError, match=r"decompression bomb refused \(64x40 = 2560 pixels, limit 1000\)"):
        open_image(Image.fromarray(asymmetric()), max_pixels=1000)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UnreadableImageError, match="cannot read image .*notes.txt"):
        open_image(text)
    with pytest.raises(UnreadableImageError, match="image file not found"):
        open_image(tmp_path / "missing.jpg")
    with pytest.raises(UnreadableImageError, match="unsupported image input of type int"):
        open_image(3)


def test_files_that_pillow_would_hand_to_ghostscript_are_never_opened(tmp_path, monkeypatch):
    """An EPS file, even named .jpg, is refused by name once its header is read; Ghostscript is never called."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: opened.append(args))
    disguised = tmp_path / "photo.jpg"
    disguised.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 40\nshowpage\n")
    for source in (disguised, disguised.read_bytes()):
        with pytest.raises(UnreadableImageError, match="EPS images are not read"):
            open_image(source)
    assert opened == []
    plain = tmp_path / "plain.ppm"
    Image.fromarray(asymmetric()).save(plain)
    np.testing.assert_array_equal(np.asarray(open_image(plain)), asymmetric())  # rarer raster formats still read


def test_listing_follows_links_once_and_accepts_dotted_parents(tmp_path, monkeypatch):
    """Issue 16 item 8 (``--images ../x/db``) and issue 12 (a symlink loop is not followed twice)."""
    db = tmp_path / ".cache" / "x" / "db"
    (db / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg", ".hidden.jpg"):
        Image.new("RGB", (8, 8)).save(db / name, format="JPEG")
    os.symlink(db, db / "sub" / "loop")  # a loop back to the top
    os.symlink(db / "sub", db / "again")  # a second way into sub
    work = tmp_path / ".cache" / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    files = list_image_files("../x/db")
    assert [f.resolve() for f in files] == [(db / "a.jpg").resolve(), (db / "sub" / "b.jpg").resolve()]
    with pytest.raises(ValueError, match="image folder not found"):
        list_image_files("../x/nothing")


def test_broken_links_and_special_files_are_listed_and_refused_by_name(tmp_path):
    """They are counted and reported as skipped, never silently left out (a FIFO is never opened:
    reading it would block)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", format="JPEG")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    assert list_image_files(tmp_path) == [tmp_path / "a.jpg", tmp_path / "dangling.jpg", tmp_path / "pipe.jpg"]
    with pytest.raises(UnreadableImageError, match=f"cannot read image {tmp_path / 'dangling.jpg'}: a broken symbolic link"):
        open_image(tmp_path / "dangling.jpg")
    with pytest.raises(UnreadableImageError, match=f"cannot read image {tmp_path / 'pipe.jpg'}: not a regular file"):
        open_image(tmp_path / "pipe.jpg")
    with pytest.raises(UnreadableImageError, match=f"image file not found: {tmp_path / 'nothing.jpg'}"):
        open_image(tmp_path / "nothing.jpg")


def test_folders_vprhub_wrote_are_not_listed_as_images(tmp_path):
    """An earlier index or kept descriptor store inside an image folder is not read as images;
    a user's folder that merely has a file of the same name is."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", format="JPEG")
    for folder, manifest, content in (
        ("old.vprindex", "vprindex.json", {"format": "vprhub-place-index"}),
        ("kept-store", "store.json", {"format": "vprhub-descriptor-store"}),
        ("shop", "store.json", {"opening_hours": "9-17"}),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / manifest).write_text(json.dumps(content))
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "b.jpg", format="JPEG")
    assert list_image_files(tmp_path) == [tmp_path / "a.jpg", tmp_path / "shop" / "b.jpg", tmp_path / "shop" / "store.json"]
