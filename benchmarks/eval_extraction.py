"""Descriptor extraction speed of `vprhub eval` (images/s) on a generated dataset.

    python benchmarks/eval_extraction.py [--model salad] [--backbone tiny] [--num-images 64]
        [--image-size 224] [--batch-sizes 1 8 32] [--device cpu] [--num-workers 0]

Images are random 480x640 JPEGs (the size of Pitts30k's), so decoding and resizing are
part of the measurement, as they are in a real evaluation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vprhub
from vprhub.evaluation import extract_descriptors
from vprhub.evaluation.extract import ImageFiles
from vprhub.modeling.image_processing import vpr_image_processor


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="salad", choices=["salad", "selavpr", "cricavpr", "megaloc"])
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random) or a Dinov2 folder / Hub id")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    model = vprhub.build_model(args.model, backbone=args.backbone, image_size=[args.image_size] * 2).eval()
    processor = vpr_image_processor(args.image_size, args.image_size)
    print(
        f"model={args.model} backbone={args.backbone} params={sum(p.numel() for p in model.parameters()):,} "
        f"image={args.image_size}px device={args.device} threads={torch.get_num_threads()} "
        f"workers={args.num_workers} images={args.num_images}"
    )
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.num_images)
        options = dict(device=args.device, num_workers=args.num_workers, progress=False)
        extract_descriptors(
            model, processor, paths[: max(args.batch_sizes)], batch_size=max(args.batch_sizes), **options
        )
        start = time.perf_counter()
        images = ImageFiles(paths, processor)
        for index in range(len(images)):
            images[index]
        seconds = time.perf_counter() - start
        print(f"decode + preprocess only    {1000 * seconds / len(paths):7.2f} ms/image")
        for batch_size in args.batch_sizes:
            start = time.perf_counter()
            descriptors = extract_descriptors(model, processor, paths, batch_size=batch_size, **options)
            seconds = time.perf_counter() - start
            print(
                f"batch_size={batch_size:>4}  {len(paths) / seconds:8.1f} images/s  "
                f"{1000 * seconds / len(paths):7.2f} ms/image  descriptors {list(descriptors.shape)}"
            )


if __name__ == "__main__":
    main()
