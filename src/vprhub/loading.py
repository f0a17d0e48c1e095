"""Loading a saved vprhub model for use, and checking the device it runs on.

:func:`load_model` is the one way the command line, the evaluation, the export and
:func:`~vprhub.pipelines.as_pipeline` open a ``--model``: only a vprhub model type, never
code from the model folder (unless the caller trusts it), never pickled code, and every
weight from the checkpoint (``VPRPreTrainedModel.from_pretrained`` is strict). Each
failure is one :class:`~vprhub.errors.VprhubError` line naming the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import IMAGE_PROCESSOR_NAME

from .conversion.checkpoint import unsafe_pickle_imports
from .errors import ModelFileError, NotAVprhubModelError, WeightsError, short_error
from .modeling import MODEL_TYPES
from .modeling.image_processing import read_image_processor
from .modeling.pretrained import IncompleteWeightsError
from .utils import opening_source

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_model_type(source: str, name: str, revision: str | None = None) -> str:
    """The ``model_type`` of ``source``'s config.json (at ``revision`` on the Hub), refused unless it
    is a vprhub one whose configuration builds from that file (runs no code)."""
    if os.path.isfile(source):
        raise NotAVprhubModelError(f"{name} is a file, not a model folder or a Hub id")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise NotAVprhubModelError(f"{name} has no config.json: not a model folder")
    config, _ = PreTrainedConfig.get_config_dict(source, revision=revision)
    if not isinstance(config, dict):
        raise ModelFileError(f"{name}: config.json is not a JSON object (got {type(config).__name__})")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise NotAVprhubModelError(
            f"{name} is a {model_type!r} model, not a vprhub model ({', '.join(MODEL_TYPES)})"
        )
    try:
        CONFIG_MAPPING[model_type].from_dict(config)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise ModelFileError(f"{name}: config.json is not a valid {model_type!r} config ({short_error(error)})") from None
    return model_type


def _read_json_object(path: Path, name: str) -> dict[str, Any]:
    """The JSON object in ``path``, else a :class:`ModelFileError` naming ``name`` and the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{name}: {path.name} is not valid JSON ({short_error(error)})") from None
    if not isinstance(content, dict):
        raise ModelFileError(f"{name}: {path.name} is not a JSON object (got {type(content).__name__})")
    return content


def _indexed_shards(index: Path, name: str) -> list[Path]:
    """The shard files the ``weight_map`` of ``index`` names: plain file names in its folder, all present."""
    content = _read_json_object(index, name)
    weight_map = content.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ModelFileError(f"{name}: {index.name} has no weight_map of tensor names to shard file names")
    if not isinstance(content.get("metadata"), dict):
        raise ModelFileError(f"{name}: {index.name} has no metadata object")
    shards = []
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in ("", ".", "..") or "\\" in shard:
            raise WeightsError(f"{name}: {index.name} names {shard!r}, not a file name inside the model folder")
        if not (index.parent / shard).is_file():
            raise WeightsError(f"{name}: {index.name} names the weights file {shard}, which is missing")
        shards.append(index.parent / shard)
    return shards


def _weight_files(folder: Path, name: str) -> tuple[list[Path], bool]:
    """The weight files transformers would read from a local ``folder`` (safetensors first, else pickled),
    and whether they are safetensors."""
    for names in (SAFETENSORS_WEIGHTS, PICKLED_WEIGHTS):
        single, index = (folder / name for name in names)
        safetensors = names is SAFETENSORS_WEIGHTS
        if single.is_file():
            return [single], safetensors
        if index.is_file():
            return _indexed_shards(index, name), safetensors
    return [], True


def check_weight_files(folder: Path, name: str) -> None:
    """Refuse a local model folder without weights, with a damaged safetensors file, with pickled code,
    or with a shard index naming files outside the folder."""
    files, safetensors = _weight_files(folder, name)
    if not files:
        raise WeightsError(f"no weights ({SAFETENSORS_WEIGHTS[0]}) in {name}")
    for path in files:
        if safetensors:
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
    """One line for a weights file transformers could not read (a Hub download checked by nobody before),
    without torch's note on a pickle protocol other than 2 (such a file is refused, or loads anyway)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
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
            check_model_type(resolved, name, kwargs.get("revision"))
        if os.path.isdir(resolved):
            check_weight_files(Path(resolved), name)
        with _explained_weight_errors(name):
            return AutoModel.from_pretrained(resolved, trust_remote_code=trust_remote_code, **kwargs)


def load_index_model(index_path: str | os.PathLike, identity: dict[str, Any] | None, model: str | None = None) -> PreTrainedModel:
    """``model`` (``--model``) if given, else the model the index at ``index_path`` recorded
    (``identity``): its folder, or its Hub id at the commit it was built with."""
    if model is not None:
        return load_model(model, "--model")
    recorded = (identity or {}).get("name_or_path")
    if recorded is None:
        raise ValueError(f"{index_path} records no model path: pass --model")
    beside = Path(index_path).parent / recorded
    if not Path(recorded).is_absolute() and beside.is_dir():
        recorded = str(beside)  # older indexes recorded the path as typed, beside the index
    revision = (identity or {}).get("revision")
    return load_model(recorded, f"the model recorded in {index_path}", **({"revision": revision} if revision else {}))


def load_model_and_processor(source: str | os.PathLike, what: str = "--model", **processor_overrides: Any):
    """:func:`load_model` and the image processor saved beside it (``processor_overrides``, e.g. ``size``)."""
    model = load_model(source, what)
    label = f"the image processor ({IMAGE_PROCESSOR_NAME}) of {what} {os.fspath(source)}"
    processor = read_image_processor(model.name_or_path, label, **processor_overrides)
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


__all__ = [
    "check_device",
    "check_model_type",
    "check_weight_files",
    "load_index_model",
    "load_model",
    "load_model_and_processor",
]
