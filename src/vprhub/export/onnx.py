"""ONNX export of any vprhub model: ``pixel_values`` in, ``descriptors`` (+ ``local_features``) out.

The graph is traced by ``torch.onnx.export`` (the dynamo exporter, which needs ``onnxscript``)
at one fixed image size. Outputs are taken from the model's output by name: ``descriptors``
always, ``local_features`` when the model returns them (SelaVPR). Models whose config has a
``batch_mode`` (CricaVPR) are exported in ``"independent"`` mode unless ``batch_mode="batch"`` is
asked for: then the graph's batch dimension is the set of images that attend to each other,
and a descriptor depends on every image fed in the same call. The preprocessing a caller must
apply (size, mean, std) and these choices are written into the model's metadata
(``onnx.ModelProto.metadata_props``, keys ``vprhub.*``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils import FileKind, atomic_write_file, check_replaceable_file

#: The exporter warns here once per torchvision operator when torchvision is not installed;
#: vprhub models use none of them and torchvision is deliberately not a dependency.
TORCHVISION_OPS_LOGGER = "torch.onnx._internal.exporter._registration"

DTYPES = {"float32": torch.float32, "float16": torch.float16}
OUTPUT_NAMES = ("descriptors", "local_features")
METADATA_PREFIX = "vprhub."
BATCH_MEANINGS = {
    "independent": "each image is encoded alone: descriptors do not depend on the other images of the batch",
    "batch": "the cross-image encoder attends across the batch: every descriptor depends on all images of "
    "the call, so feed the same groups (size and order) as the reference evaluation to reproduce it",
}


class DescriptorGraph(nn.Module):
    """``pixel_values`` -> the named tensors of a vprhub model's output, as a tuple (what ONNX needs)."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values=pixel_values)
        return tuple(getattr(output, name) for name in self.output_names)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how far onnxruntime is from PyTorch on the tracing input.

    Args:
        path: the ``.onnx`` file.
        output_names: graph outputs, in order.
        metadata: the ``vprhub.*`` metadata written into the file.
        max_abs_diff: per output, max |onnxruntime - PyTorch| on the example batch (``None`` when
            onnxruntime is not installed).
    """

    path: Path
    output_names: tuple[str, ...]
    metadata: dict[str, str]
    max_abs_diff: dict[str, float] | None


def _batch_mode(model: nn.Module, batch_mode: str | None) -> str | None:
    has_mode = hasattr(getattr(model, "config", None), "batch_mode")
    if batch_mode is not None and not has_mode:
        raise ValueError(f"--batch-mode applies to batch-dependent models (CricaVPR), not {type(model).__name__}")
    if not has_mode:
        return None
    batch_mode = batch_mode or "independent"
    if batch_mode not in BATCH_MEANINGS:
        raise ValueError(f"batch_mode must be one of {sorted(BATCH_MEANINGS)}, got {batch_mode!r}")
    return batch_mode


def _is_vprhub_onnx(path: Path) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError):
        return False
    return any(prop.key.startswith(METADATA_PREFIX) for prop in proto.metadata_props)


ONNX_FILE = FileKind("an ONNX graph written by vprhub (vprhub.* metadata)", _is_vprhub_onnx)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    height: int,
    width: int,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    dtype: str = "float32",
    batch_mode: str | None = None,
    image_processor=None,
    overwrite: bool = False,
    verify: bool = True,
) -> OnnxExport:
    """Write ``model`` as an ONNX graph taking ``pixel_values`` ``[B, 3, height, width]``.

    Args:
        model: a vprhub model (any ``model_type``); it is put in eval mode, and a float16 export
            works on a copy.
        path: the ``.onnx`` file, written atomically. An existing file is replaced only with
            ``overwrite`` and only if vprhub wrote it.
        height, width: input size in pixels, multiples of the patch size.
        dynamic_batch: a symbolic batch dimension; otherwise the batch is ``batch_size``.
        dtype: ``"float32"`` or ``"float16"`` weights and input; outputs stay float32.
        batch_mode: for models with ``config.batch_mode``: ``"independent"`` (default) or ``"batch"``.
        image_processor: the model's processor; its mean and std are recorded in the metadata.
        verify: run the file with onnxruntime (CPU) on the example batch and report the difference.
    """
    import onnx

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    patch = model.config.backbone_config.patch_size
    if height < patch or width < patch or height % patch or width % patch:
        raise ValueError(f"height and width must be positive multiples of the patch size {patch}, got {height}x{width}")
    check_replaceable_file(path, overwrite, ONNX_FILE)
    mode = _batch_mode(model, batch_mode)
    example_batch = 2 if dynamic_batch else batch_size  # a dynamic dimension cannot be traced at size 1
    if mode == "batch" and example_batch == 1:
        raise ValueError("batch mode with a batch of one image is the independent mode: pass --dynamic-batch or "
                         "--batch-size N (N > 1)")
    original_mode = getattr(model.config, "batch_mode", None)
    model = model.eval()
    if dtype == "float16":
        model = _half_copy(model)
    if mode is not None:
        model.config.batch_mode = mode
    try:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(example_batch, 3, height, width, generator=generator)
        with torch.no_grad():
            reference = model(pixel_values=example.to(DTYPES[dtype]))
        output_names = tuple(n for n in OUTPUT_NAMES if isinstance(getattr(reference, n, None), torch.Tensor))
        graph = DescriptorGraph(model, output_names).eval()
        dynamic_shapes = {"pixel_values": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
        with warnings.catch_warnings(), _quiet_logger(TORCHVISION_OPS_LOGGER):
            warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.onnx.export(
                graph,
                (example.to(DTYPES[dtype]),),
                input_names=["pixel_values"],
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                verbose=False,
            )
    finally:
        if original_mode is not None:
            model.config.batch_mode = original_mode
    proto = program.model_proto
    metadata = _metadata(model, height, width, dtype, dynamic_batch, batch_size, mode, output_names, image_processor)
    proto.doc_string = _doc(metadata)
    onnx.helper.set_model_props(proto, metadata)
    with atomic_write_file(path) as handle:
        handle.write(proto.SerializeToString())
    diff = None
    if verify:
        expected = {n: getattr(reference, n).float().numpy() for n in output_names}
        diff = _verify(path, example.to(DTYPES[dtype]).numpy(), expected)
    return OnnxExport(path, output_names, metadata, diff)


def _half_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).half().eval()


def _metadata(model, height, width, dtype, dynamic_batch, batch_size, mode, output_names, image_processor) -> dict:
    from .. import __version__

    metadata = {
        "model_type": model.config.model_type,
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "input": f"pixel_values [{'batch' if dynamic_batch else batch_size}, 3, {height}, {width}] {dtype}",
        "outputs": ", ".join(output_names),
        "image_size": json.dumps([height, width]),
        "dtype": dtype,
        "vprhub_version": __version__,
    }
    if image_processor is not None:
        metadata["image_mean"] = json.dumps(list(image_processor.image_mean))
        metadata["image_std"] = json.dumps(list(image_processor.image_std))
    if mode is not None:
        metadata["batch_mode"] = mode
        metadata["batch_meaning"] = BATCH_MEANINGS[mode]
    return {METADATA_PREFIX + k: v for k, v in metadata.items()}


def _doc(metadata: dict[str, str]) -> str:
    """The graph's doc string: how to prepare the input and read the outputs."""
    m = {key.removeprefix(METADATA_PREFIX): value for key, value in metadata.items()}
    lines = [
        f"vprhub {m['model_type']} place-recognition model.",
        f"Input {m['input']}: RGB resized to {m['image_size']} (H, W), scaled to [0, 1], normalised "
        f"with mean {m.get('image_mean')} and std {m.get('image_std')}.",
        f"Outputs: {m['outputs']} (float32; descriptors are L2-normalised).",
    ]
    if "batch_mode" in m:
        lines.append(f"Batch mode {m['batch_mode']}: {m['batch_meaning']}.")
    return "\n".join(lines)


def _verify(path: Path, example: np.ndarray, expected: dict[str, np.ndarray]) -> dict[str, float] | None:
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(expected), {"pixel_values": example})
    return {name: float(np.abs(out - expected[name]).max()) for name, out in zip(expected, outputs)}


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from the logger ``name`` while inside."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
