"""Reading official checkpoints safely and checking their keys."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..modeling.pretrained import summarize_names

CONTAINER_KEYS = ("model_state_dict", "state_dict")
# What torch's own checkpoints import (tensor rebuilders, OrderedDict): not worth naming in a refusal.
TORCH_CHECKPOINT_IMPORTS = ("torch.", "collections.OrderedDict", "_codecs.encode")
IMPORT_NAME = re.compile(r"[A-Za-z_][\w.]*")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint and return its flat state_dict.

    A ``.safetensors`` file (MegaLoc) is read with safetensors; anything else with
    ``torch.load(weights_only=True)``, as a plain state_dict or a dict wrapping it under
    ``model_state_dict`` (SelaVPR, CricaVPR) or ``state_dict`` (Lightning).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} cannot be read as a safetensors file (truncated or corrupt?): {error}") from None
        if not state_dict:
            raise ValueError(f"{path} holds no tensors")
        return state_dict
    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: not for a file vprhub cannot trust
        imports = unsafe_pickle_imports(path)
        if imports:
            raise ValueError(f"{path}: refusing pickled weights that import {', '.join(imports)}") from None
        raise ValueError(
            f"{path} is not a checkpoint vprhub can read safely (expected a PyTorch checkpoint of tensors "
            "or a .safetensors file)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(f"{path} holds no tensors (keys: {sorted(obj)[:10]})")
    return state_dict


def _pickle_globals(stream: IO[bytes]) -> Iterator[str]:
    """``module.name`` of each global one pickle in ``stream`` loads (read by ``pickletools``, never run)."""
    strings: list[str] = []  # pushed so far, for STACK_GLOBAL (module and name pushed just before)
    memo: dict[int, str | None] = {}
    pushed: str | None = None  # the string on top of the stack, when the last push was one
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "MEMOIZE":
            memo[len(memo)] = pushed
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed
            continue
        pushed = None
        if name in ("GLOBAL", "INST"):
            yield arg.replace(" ", ".")
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            yield ".".join(strings[-2:])
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(arg)
        elif isinstance(arg, str):
            pushed = arg
        if pushed is not None:
            strings.append(pushed)


def unsafe_pickle_imports(path: str | os.PathLike) -> list[str]:
    """The globals outside torch's own that the pickles of ``path`` (a plain pickle, torch's legacy
    format, or the ``data.pkl`` of a torch zip) would import; read with ``pickletools``, nothing runs."""
    found: list[str] = []
    with contextlib.ExitStack() as stack:
        if zipfile.is_zipfile(path):
            archive = stack.enter_context(zipfile.ZipFile(path))
            pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
            stream: IO[bytes] = io.BytesIO(archive.read(pickles[0]) if pickles else b"")
        else:
            stream = stack.enter_context(open(path, "rb"))
        with contextlib.suppress(ValueError, EOFError, UnicodeDecodeError):  # the end, or bytes after the pickles
            while True:
                found += _pickle_globals(stream)
    return [
        name
        for name in dict.fromkeys(found)
        if IMPORT_NAME.fullmatch(name) and not name.startswith(TORCH_CHECKPOINT_IMPORTS)
    ]


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (e.g. DataParallel's ``module.``) from every key that has it."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}


def check_keys(
    model_name: str, present: Iterable[str], required: Iterable[str], *, path: str | os.PathLike | None = None
) -> None:
    """Raise a ``ValueError`` listing missing and unexpected keys, if any."""
    present, required = set(present), set(required)
    missing, unexpected = sorted(required - present), sorted(present - required)
    if missing or unexpected:
        where = f" in {path}" if path else ""
        raise ValueError(
            f"not a {model_name} checkpoint{where}: "
            f"missing keys {summarize_names(missing)}; unexpected keys {summarize_names(unexpected)}"
        )


def check_shapes(model_name: str, weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` listing the tensors whose shapes differ from the model's."""
    wrong = [
        f"{key} {tuple(weights[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(weights)
        if key in expected and weights[key].shape != expected[key].shape
    ]
    if wrong:
        raise ValueError(f"the {model_name} checkpoint's tensors do not fit one architecture: {summarize_names(wrong)}")
