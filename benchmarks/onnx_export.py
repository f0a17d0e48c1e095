"""ONNX export: export time, onnxruntime (CPU) vs PyTorch agreement and latency, per model type.

Random-weight models at the given backbone size (default: the tiny test backbone; ``--width 768
--depth 12`` for a ViT-B-sized graph). Prints, per model: export seconds, file size, max
|onnxruntime - PyTorch| of each output on a fresh batch, and ms/image of both on this CPU.

    python benchmarks/onnx_export.py [--models salad selavpr cricavpr] [--size 224] [--batch 4] [--width 64 --depth 2]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from vprhub.export.onnx import export_onnx
from vprhub.factory import build_model
from vprhub.modeling.backbone import tiny_dinov2_config


def _ms_per_image(run, batch: int, repeats: int) -> float:
    run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1000 * (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["salad", "selavpr", "cricavpr"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of both runtimes (default 1: a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = max(1, args.width // 64)
    backbone = tiny_dinov2_config(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=heads)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(f"backbone width {args.width}, depth {args.depth}; input {args.batch}x3x{args.size}x{args.size}; "
          f"{torch.get_num_threads()} threads")
    for model_type in args.models:
        torch.manual_seed(0)
        model = build_model(model_type, backbone_config=backbone, initializer_range=0.1).eval()
        if hasattr(model.config, "batch_mode"):
            model.config.batch_mode = "independent"  # what the graph exports by default
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{model_type}.onnx"
            start = time.perf_counter()
            export_onnx(model, path, args.size, args.size, dynamic_batch=True, verify=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():  # timed before onnxruntime starts its (spinning) thread pool
                reference = model(pixel_values=x)
                torch_ms = _ms_per_image(lambda: model(pixel_values=x), args.batch, args.repeats)
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.intra_op_num_threads = args.threads
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = session.run(names, {"pixel_values": x.numpy()})
            diffs = ", ".join(
                f"{name} {np.abs(out - getattr(reference, name).numpy()).max():.1e}"
                for name, out in zip(names, outputs)
            )
            ort_ms = _ms_per_image(lambda: session.run(names, {"pixel_values": x.numpy()}), args.batch, args.repeats)
            size = path.stat().st_size / 2**20
            print(
                f"{model_type:9s} export {seconds:5.1f} s, {size:6.1f} MiB; max |ORT - torch|: {diffs}; "
                f"onnxruntime {ort_ms:.1f} ms/image, PyTorch {torch_ms:.1f} ms/image"
            )


if __name__ == "__main__":
    main()
