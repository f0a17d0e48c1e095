"""``vprhub export onnx MODEL OUT.onnx``: a model as an ONNX graph."""

from __future__ import annotations

import argparse

from ..utils import check_replaceable_file

EXTRA_HINT = "ONNX export needs the export extra: pip install 'vprhub[export]'"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command (with ``onnx``)."""
    export = subparsers.add_parser("export", help="export a model for other runtimes (ONNX)")
    formats = export.add_subparsers(dest="export_format", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="write an ONNX graph: pixel_values -> descriptors (+ local_features for SelaVPR)",
        description="Trace MODEL at one image size into OUT.onnx, then check it with onnxruntime on CPU.",
    )
    onnx.add_argument("model", help="save_pretrained folder or Hub id of a vprhub model")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--height", type=int, help="input height in pixels (default: the image processor's)")
    onnx.add_argument("--width", type=int, help="input width in pixels (default: the image processor's)")
    batch = onnx.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension")
    batch.add_argument("--batch-size", type=int, default=1, help="a fixed batch instead (default 1)")
    onnx.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weights and input dtype")
    onnx.add_argument(
        "--batch-mode",
        choices=["independent", "batch"],
        help="batch-dependent models (CricaVPR): 'independent' (default) encodes each image alone; 'batch' makes "
        "the graph's batch the set of images that attend to each other",
    )
    onnx.add_argument("--overwrite", action="store_true", help="replace an .onnx file that vprhub wrote")
    onnx.set_defaults(func=onnx_command)


def onnx_command(args: argparse.Namespace) -> int:
    try:
        from .onnx import ONNX_FILE, export_onnx
    except ModuleNotFoundError as error:
        raise ValueError(f"{EXTRA_HINT} ({error})") from None
    from ..evaluation.cli import load_model

    check_replaceable_file(args.out, args.overwrite, ONNX_FILE)  # before loading the model
    model, image_processor = load_model(args.model)
    height = args.height or image_processor.size["height"]
    width = args.width or image_processor.size["width"]
    result = export_onnx(
        model,
        args.out,
        height,
        width,
        dynamic_batch=args.dynamic_batch,
        batch_size=args.batch_size,
        dtype=args.dtype,
        batch_mode=args.batch_mode,
        image_processor=image_processor,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.path}: {result.metadata['vprhub.input']} -> {', '.join(result.output_names)}")
    if result.max_abs_diff is not None:
        diffs = ", ".join(f"{name} {value:.2e}" for name, value in result.max_abs_diff.items())
        print(f"onnxruntime (CPU) vs PyTorch on a random batch, max |difference|: {diffs}")
    return 0
