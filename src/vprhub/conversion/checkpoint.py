"""Reading official checkpoints safely and checking their keys."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONTAINER_KEYS = ("model_state_dict", "state_dict")


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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
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
            f"missing keys {_summary(missing)}; unexpected keys {_summary(unexpected)}"
        )


def check_shapes(model_name: str, weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` listing the tensors whose shapes differ from the model's."""
    wrong = [
        f"{key} {tuple(weights[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(weights)
        if key in expected and weights[key].shape != expected[key].shape
    ]
    if wrong:
        raise ValueError(f"the {model_name} checkpoint's tensors do not fit one architecture: {_summary(wrong)}")


def _summary(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... and {len(keys) - limit} more' if len(keys) > limit else ''}] ({len(keys)})"
