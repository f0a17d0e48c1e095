"""Loading the official-code parity fixtures in tests/fixtures/parity (see its README)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    """``$VPRHUB_PARITY_DIR`` when set, else the copy inside the repository."""
    root = Path(os.environ.get("VPRHUB_PARITY_DIR", REPO_ROOT / "tests" / "fixtures" / "parity"))
    if not root.is_dir():
        raise FileNotFoundError(f"parity fixtures not found at {root}; set VPRHUB_PARITY_DIR")
    return root


def load_manifest(fixture: str) -> dict:
    return json.loads((parity_dir() / fixture / "manifest.json").read_text())


def load_expected(fixture: str, name: str = "expected.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(parity_dir() / fixture / name))


def regenerate_weights(manifest: dict) -> dict[str, torch.Tensor]:
    """The official state_dict, regenerated from the manifest's seed (README section 1)."""
    rng = np.random.default_rng(manifest["seed"])
    weights = {}
    for entry in manifest["params"]:
        shape, init = tuple(entry["shape"]), entry["init"]
        count = int(np.prod(shape, dtype=np.int64))
        if init["kind"] == "normal":
            values = rng.standard_normal(count, dtype=np.float32) * np.float32(init["std"]) + np.float32(init["mean"])
            if init.get("abs", False):
                values = np.abs(values)
        elif init["kind"] == "const":
            values = np.full(count, init["value"], dtype=entry["dtype"])
        else:
            raise ValueError(f"unknown init kind {init['kind']!r}")
        weights[entry["key"]] = torch.from_numpy(values.reshape(shape))
    return weights


def make_inputs(manifest: dict) -> dict[str, torch.Tensor]:
    """The fixture's model inputs, NCHW float32, from the second generator."""
    rng = np.random.default_rng(manifest["seed"] + 1)
    return {
        t["name"]: torch.from_numpy(
            rng.standard_normal(int(np.prod(t["shape"], dtype=np.int64)), dtype=np.float32).reshape(t["shape"])
        )
        for t in manifest["inputs"]["tensors"]
    }


def local_sim_maps(manifest: dict) -> tuple[torch.Tensor, ...]:
    """SelaVPR fixture: random unit local maps R0, R1, R2 and the constant map E0 (61x61x128)."""
    rng = np.random.default_rng(manifest["seed"] + 2)
    maps = []
    for _ in range(3):
        z = rng.standard_normal(61 * 61 * 128, dtype=np.float32).reshape(61, 61, 128)
        maps.append(torch.from_numpy(z / np.linalg.norm(z, axis=-1, keepdims=True)))
    e0 = torch.zeros(61, 61, 128)
    e0[..., 0] = 1.0
    return (*maps, e0)


def tolerance(manifest: dict, name: str) -> float:
    return manifest["outputs"]["tolerance"][name]["atol"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str) -> float:
    """Assert ``max|actual - expected| <= atol`` (rtol 0); return the max-abs difference."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.double()).abs().max().item()
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > {atol:.0e}"
    return diff
