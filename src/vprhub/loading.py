"""Loading a saved vprhub model for use, and checking the device it runs on.

:func:`load_model` is the one way the command line, the evaluation, the export and
:func:`~vprhub.pipelines.as_pipeline` open a ``--model``: only a vprhub model type, never
code from the model folder (unless the caller trusts it), never pickled code, and every
weight from the checkpoint (``VPRPreTrainedModel.from_pretrained`` is strict). Each
failure is one :class:`~vprhub.errors.VprhubError` line naming the model.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoImageProcessor, AutoModel, PreTrainedConfig, PreTrainedModel

from .conversion.checkpoint import unsafe_pickle_imports
from .errors import NotAVprhubModelError, WeightsError
from .modeling import MODEL_TYPES
from .modeling.pretrained import IncompleteWeightsError
from .utils import opening_source

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_model_type(source: str, name: str) -> str:
    """The ``model_type`` of ``source``'s config.json, refused unless it is a vprhub one (runs no code)."""
    config, _ = PreTrainedConfig.get_config_dict(source)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise NotAVprhubModelError(
            f"{name} is a {model_type!r} model, not a vprhub model ({', '.join(MODEL_TYPES)})"
        )
    return model_type


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from a local ``folder``: safetensors first, else pickled."""
    for names in (SAFETENSORS_WEIGHTS, PICKLED_WEIGHTS):
        single, index = (folder / name for name in names)
        if single.is_file():
            return [single]
        if index.is_file():
            return sorted(folder.glob(f"{single.stem}-*-of-*{single.suffix}"))
    return []


def check_weight_files(folder: Path, name: str) -> None:
    """Refuse a local model folder without weights, with a damaged safetensors file or with pickled code."""
    files = _weight_files(folder)
    if not files:
        raise WeightsError(f"no weights ({SAFETENSORS_WEIGHTS[0]}) in {name}")
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as error:
                raise WeightsError(f"{name}: weights file {path.name} is damaged ({error})") from None
            except OSError as error:
                raise WeightsError(f"{name}: cannot read weights file {path.name} ({error.strerror or error})") from None
        elif imports := unsafe_pickle_imports(path):
            raise WeightsError(f"{name}: refusing pickled weights that import {', '.join(imports)}")


@contextlib.contextmanager
def _explained_weight_errors(name: str) -> Iterator[None]:
    """One line for a weights file transformers could not read (a Hub download checked by nobody before)."""
    try:
        yield
    except pickle.UnpicklingError:
        raise WeightsError(f"{name}: refusing pickled weights that torch's weights-only loader rejects") from None
    except SafetensorError as error:
        raise WeightsError(f"{name}: a weights file is damaged ({error})") from None
    except IncompleteWeightsError as error:
        raise WeightsError(f"{name}: {error}") from None


def load_model(
    source: str | os.PathLike, what: str = "--model", *, trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """The vprhub model saved in the folder or Hub repository ``source`` (``what`` names it in errors).

    Without ``trust_remote_code`` only vprhub model types load, with vprhub's own code. ``kwargs``
    go to ``from_pretrained``.
    """
    name = f"{what} {os.fspath(source)}"
    with opening_source(source, what) as resolved:
        if not trust_remote_code:
            check_model_type(resolved, name)
        if os.path.isdir(resolved):
            check_weight_files(Path(resolved), name)
        with _explained_weight_errors(name):
            return AutoModel.from_pretrained(resolved, trust_remote_code=trust_remote_code, **kwargs)


def load_model_and_processor(source: str | os.PathLike, what: str = "--model", **processor_overrides: Any):
    """:func:`load_model` and the image processor saved beside it (``processor_overrides``, e.g. ``size``)."""
    model = load_model(source, what)
    processor = AutoImageProcessor.from_pretrained(model.name_or_path, trust_remote_code=False, **processor_overrides)
    return model, processor


def check_device(device: str | None) -> str | None:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...) if this torch can run on it, else a clear ValueError."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or xpu")
    if parsed.type == "cpu":
        return device
    built_for = torch.accelerator.current_accelerator()  # this build's accelerator, available or not
    label = parsed.type.upper()
    if built_for is None or built_for.type != parsed.type:
        has = f"{built_for.type} only" if built_for is not None else "CPU only"
        raise ValueError(f"{label} is not available in this torch build ({has})")
    count = torch.accelerator.device_count()
    if count == 0:
        raise ValueError(f"{label} is not available: torch sees no {label} device")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device {device!r} does not exist: torch sees {count} {label} device(s), "
            f"{parsed.type}:0 to {parsed.type}:{count - 1}"
        )
    return device


__all__ = ["check_device", "check_model_type", "check_weight_files", "load_model", "load_model_and_processor"]
