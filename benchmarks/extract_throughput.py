"""Embedding throughput: per stage and end to end from JPEG files, images/s and peak memory.

    python benchmarks/extract_throughput.py --quick                    # CPU, tiny models, seconds
    python benchmarks/extract_throughput.py --device cuda --backbone vitb14 \\
        --models salad cricavpr --precisions float32 bfloat16 --compile --num-images 4096

Stages (one process, ms per image): ``decode`` (open + full decode of the JPEG), ``resize``
(to the model size, uint8), ``transfer`` (uint8 batch -> normalised ``pixel_values`` on the
device), ``forward`` (the model; synchronised on CUDA), ``write`` (a store shard). End to end:
``Embedder.embed_to_store`` from the JPEG files with ``--num-workers`` decoding processes.

Then the issue-12 CPU goal: the marginal rate of ``vprhub index build`` (tiny SALAD at
``--build-size``, 640x480 JPEGs: (n2 - n1) / (t2 - t1) over two folder sizes, so start-up
cancels) against Pillow decode + resize on the same cores in the same run (one process per
core), and the ratio of the two. ``--backbone vitb14`` / ``vitl14`` build random full-size
backbones (no download) for GPU figures. Peak memory: resident set (this process and its
decoding workers) and, on CUDA, ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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


def write_jpegs(folder: Path, count: int, start: int = 0) -> list[Path]:
    """640 x 480 JPEGs (Pitts30k's size) of smooth random content, quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


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


def stages(engine: Embedder, paths: list[Path], batch_size: int, local: bool, store_dir: Path) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process."""
    size = engine.preprocessing.size
    timings = {}
    start = time.perf_counter()
    decoded = [open_image(p) for p in paths]
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    pixels = torch.from_numpy(np.stack([np.asarray(im.resize(size[::-1], Image.BILINEAR)) for im in decoded]))
    timings["resize"] = time.perf_counter() - start
    batches = pixels.split(batch_size)
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
    timings["forward"] = time.perf_counter() - start - timings["transfer"]  # forward() includes the transfer
    descriptors = np.concatenate([d for d, _ in outputs])
    maps = np.concatenate([m for _, m in outputs]) if local else None
    store = DescriptorStore.create(store_dir, {"benchmark": True}, len(paths), len(paths), "float32")
    start = time.perf_counter()
    store.write(Shard(0, np.arange(len(paths)), descriptors, maps))
    timings["write"] = time.perf_counter() - start
    return {name: 1000 * seconds / len(paths) for name, seconds in timings.items()}


def end_to_end(engine: Embedder, paths: list[Path], local: bool, store_dir: Path) -> float:
    engine.embed_to_store(paths[: engine.batch_size], store_dir / "warm", local, progress=False)
    start = time.perf_counter()
    engine.embed_to_store(paths, store_dir / "run", local, progress=False)
    sync(engine.device)
    return len(paths) / (time.perf_counter() - start)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_SIZES), choices=list(MODEL_SIZES))
    parser.add_argument("--backbone", default="tiny", choices=["tiny", *BACKBONES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS)
    parser.add_argument("--attention", default="sdpa", help="attention implementation ('none' keeps the model's)")
    parser.add_argument("--compile", action="store_true", help="also measure each variant under torch.compile")
    parser.add_argument("--num-images", type=int, default=256)
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
        args.num_images, args.batch_size, args.build_images = 32, 8, [32, 160]
        args.models, args.precisions, args.build_precisions = ["salad"], ["float32"], ["float32"]
    device = torch.device(args.device)
    attention = None if args.attention == "none" else args.attention
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
        f"cpus) torch={torch.__version__} threads={torch.get_num_threads()} backbone={args.backbone} "
        f"images={args.num_images} batch={args.batch_size} workers={args.num_workers}"
    )
    with tempfile.TemporaryDirectory(prefix="vprhub-bench-") as folder:
        root = Path(folder)
        paths = write_jpegs(root / "jpegs", args.num_images)
        header = f"{'model':<9}{'precision':<19}{'compile':<8}" + "".join(
            f"{s:>10}" for s in ("decode", "resize", "transfer", "forward", "write")
        )
        print(f"\nper stage in ms/image; end to end in images/s\n{header}{'e2e img/s':>11}{'RSS MiB':>9}{'GPU MiB':>9}")
        run = 0
        for model_type in [] if args.build_only else args.models:
            size = MODEL_SIZES[model_type]
            for precision in args.precisions:
                for compiled in [False, True] if args.compile else [False]:
                    torch.manual_seed(0)
                    model = build(model_type, args.backbone, size)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    engine = Embedder(
                        model,
                        vpr_image_processor(size, size),
                        device=device,
                        precision=precision,
                        attention=attention,
                        compile=compiled,
                        batch_size=args.batch_size,
                        num_workers=args.num_workers,
                    )
                    local = model_type == "selavpr"
                    run += 1
                    ms = stages(engine, paths, args.batch_size, local, root / f"stages-{run}")
                    rate = end_to_end(engine, paths, local, root / f"e2e-{run}")
                    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
                    print(
                        f"{model_type:<9}{precision:<19}{str(compiled):<8}"
                        + "".join(f"{ms[s]:>10.2f}" for s in ("decode", "resize", "transfer", "forward", "write"))
                        + f"{rate:>11.1f}{peak_rss_mib():>9.0f}{gpu:>9.0f}"
                    )
                    del engine, model
        if not args.skip_build:
            marginal_rate(args, root)


if __name__ == "__main__":
    main()
