"""Training throughput (images/s) and peak memory at a recipe's settings.

    python benchmarks/train_throughput.py --recipe training/salad.yaml
    python benchmarks/train_throughput.py --recipe training/cricavpr.yaml --steps 20
    python benchmarks/train_throughput.py --recipe training/salad.yaml --mixed_precision bf16 --torch_compile true

The backbone is a randomly initialised Dinov2 of the recipe's size (no download: weights do
not change the speed). On a GPU the recipe's batch (P places x K images), resolution and
mixed precision are used; on CPU the batch is reduced (``--cpu_places``, printed) and the
precision is float32. The trained parameters are the trainer's (its ``mark_trainable`` call;
the count is printed). Two figures are printed: the optimisation step alone (forward, loss,
backward, optimizer, on pre-built batches) and the data pipeline alone (synthetic images,
augmentation, collation, with the recipe's DataLoader workers).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from accelerate import Accelerator
from transformers import AutoConfig, Dinov2Config

from vprhub.data import SyntheticPlaces
from vprhub.data.transforms import RandAugment
from vprhub.modeling import MODEL_CLASSES
from vprhub.modeling.adapters import count_parameters
from vprhub.modeling.image_processing import vpr_image_processor
from vprhub.training import MultiSimilarityObjective, PlaceBatchSampler, parse_args
from vprhub.training.data import AugmentedPlaces, PlaceBatchCollator
from vprhub.training.loop import _mark_trainable, apply_speed_options, enable_gradient_checkpointing
from vprhub.training.losses import local_feature_loss
from vprhub.training.optimization import build_optimizer, trainable_parameters

# Dinov2 sizes of the Hub checkpoints, so that nothing is downloaded.
DINOV2_SIZES = {
    "facebook/dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "facebook/dinov2-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "facebook/dinov2-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


def backbone_config(name: str):
    if name in DINOV2_SIZES:
        return Dinov2Config(image_size=518, patch_size=14, **DINOV2_SIZES[name])
    return AutoConfig.from_pretrained(name)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="training/salad.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed optimisation steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cpu_places", type=int, default=4, help="places per batch on CPU (reduced)")
    parser.add_argument("--data_batches", type=int, default=5, help="timed batches of the data pipeline")
    options, trainer_options = parser.parse_known_args()  # the rest: train.py options, e.g. --torch_compile true

    model_args, data_args, args = parse_args(["--config", options.recipe, *trainer_options])
    accelerator = Accelerator(mixed_precision=args.mixed_precision if torch.cuda.is_available() else "no")
    device = accelerator.device
    places_per_batch = data_args.places_per_batch if device.type == "cuda" else options.cpu_places
    config_class, model_class = MODEL_CLASSES[model_args.model]
    config = config_class(backbone_config=backbone_config(model_args.backbone), **model_args.overrides())
    model = model_class(config)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _mark_trainable(model, args)  # the trainer's freezing (e.g. CricaVPR's frozen Dinov2), as Trainer calls it
    apply_speed_options(model, args)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(trainable_parameters(model), args)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = MultiSimilarityObjective(args.ms_alpha, args.ms_beta, args.ms_base, args.miner_epsilon)

    size = tuple(data_args.image_size)
    batch_images = places_per_batch * data_args.images_per_place
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    print(
        f"recipe {options.recipe}: {model_args.model}, backbone {model_args.backbone} (random weights), "
        f"{size[0]}x{size[1]}, batch {places_per_batch} places x {data_args.images_per_place} images"
        + ("" if device.type == "cuda" else f" (REDUCED on CPU; recipe: {data_args.places_per_batch} places)")
        + f", precision {accelerator.mixed_precision}, {args.attn_implementation} attention, "
        f"{'fused' if args.fused_optimizer else 'unfused'} {args.optimizer}"
        + (f", torch.compile ({args.torch_compile_backend})" if args.torch_compile else "")
    )

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_images, 3, *size, generator=generator).to(device)
    labels = torch.arange(places_per_batch, device=device).repeat_interleave(data_args.images_per_place)
    model.train()

    def step() -> None:
        outputs = model(pixel_values=pixel_values)
        loss = objective(outputs.descriptors, labels).loss
        if args.local_loss_weight:
            loss = loss + args.local_loss_weight * local_feature_loss(
                outputs.local_features, outputs.descriptors, labels
            )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(options.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(options.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(
        f"optimisation: {options.steps * batch_images / seconds:.1f} images/s "
        f"({seconds / options.steps * 1000:.0f} ms/step), peak memory {peak_memory_mib(device):.0f} MiB "
        f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'}), "
        f"{trainable / 1e6:.1f} M of {total / 1e6:.1f} M parameters trainable"
    )

    workers = data_args.num_workers if device.type == "cuda" else min(data_args.num_workers, os.cpu_count() or 1)
    places = SyntheticPlaces(places_per_batch * options.data_batches, data_args.images_per_place, size)
    augment = (
        RandAugment(data_args.rand_augment_ops, data_args.rand_augment_magnitude)
        if data_args.rand_augment_ops
        else None
    )
    loader = torch.utils.data.DataLoader(
        AugmentedPlaces(places, size, augment),
        batch_sampler=PlaceBatchSampler(places.labels, places_per_batch, data_args.images_per_place),
        collate_fn=PlaceBatchCollator(vpr_image_processor(*size)),
        num_workers=workers,
    )
    start = time.perf_counter()
    count = sum(len(batch["labels"]) for batch in loader)
    seconds = time.perf_counter() - start
    print(
        f"data pipeline: {count / seconds:.1f} images/s with {workers} workers (synthetic images"
        + (")" if workers == data_args.num_workers else f"; recipe: {data_args.num_workers} workers)")
    )


if __name__ == "__main__":
    main()
