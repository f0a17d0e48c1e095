"""``vprhub convert MODEL CHECKPOINT OUT_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CONVERTERS, convert_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a released official checkpoint into a save_pretrained folder"
    )
    parser.add_argument("model", choices=sorted(CONVERTERS), help="which official model the checkpoint holds")
    parser.add_argument("checkpoint", help="the official checkpoint file (.ckpt / .pth / .safetensors)")
    parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, preprocessor_config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an OUT_DIR written by an earlier conversion")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads of the ViT (default: by width)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also push the converted model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = convert_checkpoint(
        args.model, args.checkpoint, args.out_dir, overwrite=args.overwrite, num_attention_heads=args.num_heads
    )
    total = sum(p.numel() for p in model.parameters())
    print(f"converted {args.model} ({total:,} parameters, descriptor {model.config.descriptor_dim}-d) -> {args.out_dir}")
    if args.push_to_hub:
        from ..hub import push_folder

        url = push_folder(args.out_dir, args.push_to_hub, conversion={"checkpoint": Path(args.checkpoint).name})
        print(f"pushed to {url}")
    return 0
