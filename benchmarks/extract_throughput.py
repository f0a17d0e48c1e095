"""Embedding throughput: per stage and end to end from JPEG files, images/s and peak memory.

    python benchmarks/extract_throughput.py --quick                    # CPU, tiny models, seconds
    python benchmarks/extract_throughput.py --device cuda --backbone vitb14 \\
        --models salad cricavpr --precisions float32 bfloat16 --compile --num-images 4096

Stages (one process, ms per image): ``decode`` (open + full decode of the JPEG) and ``resize``
(to the model size, uint8), both on a fixed sample of ``--stage-images`` files, once per model
size; the resized sample is then tiled up to ``--num-images`` for ``transfer`` (uint8 batch ->
normalised ``pixel_values`` on the device), ``model`` (the model alone, as the official anchors
time it: inputs already on the device, no copy back; synchronised on CUDA), ``fwd+copy``
(``Embedder.forward`` less the transfer: the model and the copy of its outputs to the host) and
``write`` (a store shard). End to end: ``Embedder.embed_to_store`` from the JPEG files with
``--num-workers`` decoding processes over ``--num-images`` files (one run: start-up included)
and, with ``--e2e-images``, the steady rate ``(n2 - n1) / (t2 - t1)`` of a second, longer run
(start-up cancels). The JPEGs (``--num-jpegs`` distinct files, cycled) are written once, in
parallel, into ``--jpeg-dir`` and reused by later runs. Each model type is built once (random
weights, seed 0) and copied for each precision, so the check line under each variant compares
its descriptors with the model type's first variant (cosine, same images, same weights).

Then the issue-12 CPU goal: the marginal rate of ``vprhub index build`` (tiny SALAD at
``--build-size``, 640x480 JPEGs: (n2 - n1) / (t2 - t1) over two folder sizes, so start-up
cancels) against Pillow decode + resize on the same cores in the same run (one process per
core), and the ratio of the two. ``--backbone vitb14`` / ``vitl14`` build random full-size
backbones (no download) for GPU figures. Peak memory: resident set (this process and its
decoding workers) and, on CUDA, ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config

import vprhub
from vprhub.descriptor_store import DescriptorStore, Shard
from vprhub.embedding import PRECISIONS, Embedder, default_num_workers
from vprhub.image_io import open_image
from vprhub.modeling import MODEL_CLASSES
from vprhub.modeling.image_processing import vpr_image_processor

# Official input sizes: SALAD and MegaLoc 322 x 322, SelaVPR and CricaVPR 224 x 224.
MODEL_SIZES = {"salad": 322, "selavpr": 224, "cricavpr": 224, "megaloc": 322}
BACKBONES = {
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


JPEG_NAME = re.compile(r"\d{6}\.jpg")


def write_jpeg(path: Path) -> None:
    """One 640 x 480 JPEG (Pitts30k's size) of smooth random content, quality 90, seeded by its
    number; written under a temporary name, then renamed (a killed run leaves no short file)."""
    rng = np.random.default_rng(int(path.stem))
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    part = path.with_name(f".{path.name}.part")
    Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(part, format="JPEG", quality=90)
    os.replace(part, path)


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``000000.jpg`` ... in ``folder``, written in parallel (one process per core); a folder that
    already holds exactly these files is reused. Refuses a folder holding files it did not write."""
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in folder.iterdir()}
    if present == {p.name for p in paths}:
        return paths
    foreign = sorted(n for n in present if not JPEG_NAME.fullmatch(n.removeprefix(".").removesuffix(".part")))
    if foreign:
        raise ValueError(f"{folder} holds {foreign[0]!r}: expected only the benchmark's JPEGs (NNNNNN.jpg)")
    for name in present:
        (folder / name).unlink()
    with multiprocessing.get_context("fork").Pool(default_num_workers()) as pool:
        pool.map(write_jpeg, paths, chunksize=16)
    return paths


def cycled(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths: ``paths`` repeated."""
    return [paths[i % len(paths)] for i in range(count)]


def build(model_type: str, backbone: str, size: int) -> torch.nn.Module:
    if backbone == "tiny":
        return vprhub.build_model(model_type, image_size=[size, size])
    config_class, model_class = MODEL_CLASSES[model_type]
    dinov2 = Dinov2Config(**BACKBONES[backbone], patch_size=14, image_size=518)
    return model_class(config_class(backbone_config=dinov2, image_size=[size, size]))


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def master_model(model_type: str, backbone: str, size: int, device: torch.device) -> torch.nn.Module:
    """The model type's weights for every variant (seed 0), initialised on ``device`` (fast on a
    GPU), kept on the CPU; each variant runs a copy."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build(model_type, backbone, size)
    return model.cpu()


def decode_sample(paths: list[Path]) -> tuple[list[Image.Image], float]:
    """The decoded images and the decode time in ms/image."""
    start = time.perf_counter()
    decoded = [open_image(p) for p in paths]
    return decoded, 1000 * (time.perf_counter() - start) / len(paths)


def resize_sample(decoded: list[Image.Image], size: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """uint8 ``[N, H, W, 3]`` at the model's ``(height, width)`` and the resize time in ms/image."""
    start = time.perf_counter()
    pixels = torch.from_numpy(np.stack([np.asarray(im.resize(size[::-1], Image.BILINEAR)) for im in decoded]))
    return pixels, 1000 * (time.perf_counter() - start) / len(decoded)


def tiled_batches(pixels: torch.Tensor, count: int, batch_size: int) -> list[torch.Tensor]:
    """``count`` images (``pixels`` repeated) in batches."""
    return list(pixels[torch.arange(count) % len(pixels)].split(batch_size))


def model_only_ms(engine: Embedder, batches: list[torch.Tensor], calls: int) -> float:
    """Milliseconds per image of ``calls`` model calls, timed as the official anchors time them:
    inputs already on the device (``batches`` cycled), the engine's model (compiled when it
    compiles) called directly in inference mode, synchronised, nothing copied back."""
    autocast = (
        torch.autocast(engine.device.type, dtype=engine.compute_dtype)
        if engine.precision.startswith("autocast-")
        else contextlib.nullcontext()
    )
    run_model = engine._run_model  # the callable Embedder.forward runs (the compiled model, if compiled)
    with torch.inference_mode(), autocast:  # as Embedder runs it: other tensors would make torch.compile recompile
        inputs = [engine.preprocessing.to_model(b, engine.device, engine.input_dtype) for b in batches]
        sync(engine.device)
        start = time.perf_counter()
        for i in range(calls):
            run_model(pixel_values=inputs[i % len(inputs)])
        sync(engine.device)
    images = sum(len(inputs[i % len(inputs)]) for i in range(calls))
    return 1000 * (time.perf_counter() - start) / images


def stages(
    engine: Embedder, batches: list[torch.Tensor], local: bool, store_dir: Path
) -> tuple[dict[str, float], np.ndarray]:
    """Milliseconds per image of the device stages (``transfer``, ``fwd+copy``, ``write``,
    ``model``), in this process, and the descriptors."""
    count = sum(len(b) for b in batches)
    timings = {}
    engine.forward(batches[0], local)  # warm-up (and compilation)
    sync(engine.device)
    start = time.perf_counter()
    for batch in batches:
        if engine.device.type == "cuda":
            batch = batch.pin_memory()
        engine.preprocessing.to_model(batch, engine.device, engine.input_dtype)
    sync(engine.device)
    timings["transfer"] = time.perf_counter() - start
    start = time.perf_counter()
    outputs = [engine.forward(batch, local) for batch in batches]
    sync(engine.device)
    timings["fwd+copy"] = time.perf_counter() - start - timings["transfer"]  # forward() includes the transfer
    descriptors = np.concatenate([d for d, _ in outputs])
    maps = np.concatenate([m for _, m in outputs]) if local else None
    store = DescriptorStore.create(store_dir, {"benchmark": True}, count, count, "float32")
    start = time.perf_counter()
    store.write(Shard(0, np.arange(count), descriptors, maps))
    timings["write"] = time.perf_counter() - start
    ms = {name: 1000 * seconds / count for name, seconds in timings.items()}
    full = [b for b in batches[:4] if len(b) == len(batches[0])]  # a few distinct full batches: one shape
    ms["model"] = model_only_ms(engine, full, len(batches))
    return ms, descriptors


def end_to_end(
    engine: Embedder, paths: list[Path], count: int, long_count: int, local: bool, store_dir: Path
) -> tuple[float, float]:
    """Images/s of ``embed_to_store`` over ``count`` files (start-up included) and, when
    ``long_count`` is larger, the steady rate ``(long_count - count) / (t2 - t1)`` of a second run
    over ``long_count`` files (start-up cancels; NaN otherwise, or when the longer run was not
    slower: too little work to tell). ``paths`` are cycled."""
    engine.embed_to_store(paths[: engine.batch_size], store_dir / "warm", local, progress=False)

    def seconds(n: int, name: str) -> float:
        start = time.perf_counter()
        engine.embed_to_store(cycled(paths, n), store_dir / name, local, progress=False)
        sync(engine.device)
        return time.perf_counter() - start

    t1 = seconds(count, "run")
    extra = seconds(long_count, "long") - t1 if long_count > count else 0.0
    steady = (long_count - count) / extra if extra > 0 else float("nan")  # NaN: too little work to tell
    return count / t1, steady


def cosine_line(descriptors: np.ndarray, reference: np.ndarray | None, reference_name: str) -> str:
    """Whether the descriptors are finite and their cosine to the reference variant's."""
    line = f"  check: descriptors finite: {bool(np.isfinite(descriptors).all())}"
    if reference is None:
        return line + " (the reference of the cosines below)"
    unit = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    unit_reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (unit * unit_reference).sum(axis=1)
    return line + (
        f"; cosine to {reference_name} (same images, same weights): mean {cosine.mean():.5f}, min {cosine.min():.5f}"
    )


def _pillow_decode_resize(args: tuple[list[str], int]) -> None:
    paths, size = args
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.BILINEAR)


def pillow_rate(paths: list[Path], size: int, processes: int) -> float:
    """Images/s of plain Pillow decode + resize, one process per core."""
    parts = [([str(p) for p in paths[i::processes]], size) for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_pillow_decode_resize, [(part[0][:2], size) for part in parts])  # warm-up
        start = time.perf_counter()
        pool.map(_pillow_decode_resize, parts)
        return len(paths) / (time.perf_counter() - start)


def index_build_seconds(model_dir: Path, images: Path, out: Path, batch_size: int, precision: str) -> float:
    command = [sys.executable, "-m", "vprhub.cli", "index", "build", "--model", str(model_dir), "--images",
               str(images), "--out", str(out), "--batch-size", str(batch_size), "--precision", precision,
               "--quiet", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def marginal_rate(args: argparse.Namespace, root: Path) -> None:
    size = args.build_size
    n1, n2 = args.build_images
    model_dir = root / "tiny-salad"
    build("salad", "tiny", size).save_pretrained(model_dir)
    vpr_image_processor(size, size).save_pretrained(model_dir)
    small = root / "db-small"
    large = root / "db-large"
    paths = write_jpegs(small, n1)
    write_jpegs(large, n2)
    cores = default_num_workers()
    pillow = pillow_rate(paths + sorted(large.iterdir()), size, cores)
    seconds = {
        precision: [
            index_build_seconds(model_dir, images, root / f"{images.name}.vprindex", args.build_batch_size, precision)
            for images in (small, large)
        ]
        for precision in args.build_precisions
    }
    pillow_again = pillow_rate(paths + sorted(large.iterdir()), size, cores)
    engine = Embedder(build("salad", "tiny", size), vpr_image_processor(size, size), num_workers=0)
    start = time.perf_counter()
    for path in paths:
        engine.preprocessing.decode(path)
    preprocessing_ms = 1000 * (time.perf_counter() - start) / len(paths)
    reference = (pillow + pillow_again) / 2
    print(f"\nvprhub index build (tiny SALAD {size}x{size}, 640x480 JPEGs, batch {args.build_batch_size}, {cores} cores)")
    print(f"  Pillow decode + resize, {cores} processes     {reference:8.1f} images/s "
          f"(before {pillow:.1f}, after {pillow_again:.1f})")
    for precision, (t1, t2) in seconds.items():
        rate = (n2 - n1) / (t2 - t1)
        print(f"  --precision {precision}: {n1} images {t1:.2f} s, {n2} images {t2:.2f} s (start-up included)")
        print(f"    marginal rate {rate:8.1f} images/s, ratio to Pillow {rate / reference:.2f} (goal >= 0.6)")
    print(f"  Pillow decode + resize per image per core {1000 * cores / reference:5.2f} ms")
    print(f"  vprhub preprocessing per image, one core {preprocessing_ms:6.2f} ms (goal <= 4.5; open_image + resize)")


STAGES = ("decode", "resize", "transfer", "model", "fwd+copy", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_SIZES), choices=list(MODEL_SIZES))
    parser.add_argument("--backbone", default="tiny", choices=["tiny", *BACKBONES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS)
    parser.add_argument("--attention", default="sdpa", help="attention implementation ('none' keeps the model's)")
    parser.add_argument("--compile", action="store_true", help="also measure each variant under torch.compile")
    parser.add_argument("--num-images", type=int, default=256, help="images per device stage and end-to-end run")
    parser.add_argument("--stage-images", type=int, default=256, help="images decoded and resized (timed once)")
    parser.add_argument("--e2e-images", type=int, default=0, help="a longer end-to-end run: the steady rate")
    parser.add_argument("--num-jpegs", type=int, help="distinct JPEG files, cycled (default: --num-images)")
    parser.add_argument("--jpeg-dir", type=Path, help="folder the JPEGs are written to once and reused from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--build-size", type=int, default=322)
    parser.add_argument("--build-images", type=int, nargs=2, default=[128, 640], metavar=("N1", "N2"))
    parser.add_argument("--build-batch-size", type=int, default=32)
    parser.add_argument("--build-precisions", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS)
    parser.add_argument("--skip-build", action="store_true", help="skip the index-build marginal rate")
    parser.add_argument("--build-only", action="store_true", help="only the index-build marginal rate")
    parser.add_argument("--quick", action="store_true", help="tiny figures for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.num_images, args.stage_images, args.batch_size, args.build_images = 32, 32, 8, [32, 160]
        args.models, args.precisions, args.build_precisions = ["salad"], ["float32"], ["float32"]
    device = torch.device(args.device)
    attention = None if args.attention == "none" else args.attention
    num_jpegs = args.num_jpegs or args.num_images
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
        f"cpus) torch={torch.__version__} threads={torch.get_num_threads()} backbone={args.backbone} "
        f"images={args.num_images} batch={args.batch_size} workers={args.num_workers} jpegs={num_jpegs} "
        f"stage sample={min(args.stage_images, num_jpegs)} e2e long run={args.e2e_images or '-'}"
    )
    with tempfile.TemporaryDirectory(prefix="vprhub-bench-") as folder:
        root = Path(folder)
        paths = write_jpegs(args.jpeg_dir or root / "jpegs", num_jpegs)
        header = f"{'model':<9}{'precision':<19}{'compile':<8}" + "".join(f"{s:>10}" for s in STAGES)
        print(
            "\nper stage in ms/image (decode, resize: the sample; model: alone, inputs on the device, no copy back;"
            " fwd+copy: with the outputs' copy to the host);\nend to end in images/s (e2e: one run of --num-images,"
            " start-up included; steady: (n2 - n1) / (t2 - t1) with a second run of --e2e-images, nan without)"
            f"\n{header}{'e2e':>8}{'steady':>8}{'RSS MiB':>9}{'GPU MiB':>9}"
        )
        if not args.build_only:
            decoded, decode_ms = decode_sample(paths[: args.stage_images])
        run = 0
        for model_type in [] if args.build_only else args.models:
            size = MODEL_SIZES[model_type]
            pixels, resize_ms = resize_sample(decoded, (size, size))
            batches = tiled_batches(pixels, args.num_images, args.batch_size)
            master = master_model(model_type, args.backbone, size, device)
            local = model_type == "selavpr"
            reference, reference_name = None, ""
            for precision in args.precisions:
                for compiled in [False, True] if args.compile else [False]:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    engine = Embedder(
                        copy.deepcopy(master),
                        vpr_image_processor(size, size),
                        device=device,
                        precision=precision,
                        attention=attention,
                        compile=compiled,
                        batch_size=args.batch_size,
                        num_workers=args.num_workers,
                    )
                    run += 1
                    ms, descriptors = stages(engine, batches, local, root / f"stages-{run}")
                    ms |= {"decode": decode_ms, "resize": resize_ms}
                    rate, steady = end_to_end(
                        engine, paths, args.num_images, args.e2e_images, local, root / f"e2e-{run}"
                    )
                    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
                    print(
                        f"{model_type:<9}{precision:<19}{str(compiled):<8}"
                        + "".join(f"{ms[s]:>10.2f}" for s in STAGES)
                        + f"{rate:>8.1f}{steady:>8.1f}{peak_rss_mib():>9.0f}{gpu:>9.0f}"
                    )
                    print(cosine_line(descriptors, reference, reference_name))
                    if reference is None:
                        reference = descriptors
                        reference_name = f"{model_type} {precision}{' compiled' if compiled else ''}"
                    del engine
        if not args.skip_build:
            marginal_rate(args, root)


if __name__ == "__main__":
    main()
