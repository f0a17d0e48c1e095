"""Adapter injection into transformers' Dinov2 layers, without forking the layer code.

Adapters are registered as ``encoder.layer.<i>.adapters.<name>`` (so Dinov2's own parameters
keep their names and pretrained Dinov2 weights still load) and wired in with forward hooks
on the layer's submodules:

* ``"attention"``: the attention output ``a`` becomes ``adapter(a)`` (before the first
  layer scale) -- SelaVPR's serial adapter, which carries its own skip connection.
* ``"mlp"``: the MLP output becomes ``mlp(y) + scale * adapter(y)`` where ``y`` is the
  second norm's output (before the second layer scale) -- a parallel adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

AdapterSite = Literal["attention", "mlp"]
ADAPTER_SITES: tuple[str, ...] = ("attention", "mlp")
ADAPTER_CONTAINER = "adapters"


def _attention_hook(module: nn.Module, args: tuple, output: tuple, *, adapter: nn.Module) -> tuple:
    return (adapter(output[0]), *output[1:])


def _mlp_hook(module: nn.Module, args: tuple, output: torch.Tensor, *, adapter: nn.Module, scale: float) -> torch.Tensor:
    return output + scale * adapter(args[0])


def inject_adapters(
    backbone: nn.Module,
    name: str,
    site: AdapterSite,
    factory: Callable[[int], nn.Module],
    *,
    scale: float = 1.0,
    layers: Iterable[int] | None = None,
) -> list[str]:
    """Add ``factory(layer_index)`` as adapter ``name`` at ``site`` of the chosen Dinov2 layers.

    Everything is validated before the model is touched. Returns the module paths of the
    adapters added (relative to ``backbone``).
    """
    if site not in ADAPTER_SITES:
        raise ValueError(f"adapter site must be one of {ADAPTER_SITES}, got {site!r}")
    if not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier, got {name!r}")
    all_layers = backbone.encoder.layer
    indices = list(range(len(all_layers))) if layers is None else sorted(set(layers))
    if not indices:
        raise ValueError("no layer selected for adapter injection")
    bad = [i for i in indices if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a backbone with {len(all_layers)} layers")
    for i in indices:
        container = getattr(all_layers[i], ADAPTER_CONTAINER, None)
        if container is not None and name in container:
            raise ValueError(f"layer {i} already has an adapter named {name!r}")

    paths = []
    for i in indices:
        layer = all_layers[i]
        if not hasattr(layer, ADAPTER_CONTAINER):
            layer.add_module(ADAPTER_CONTAINER, nn.ModuleDict())
        adapter = factory(i)
        getattr(layer, ADAPTER_CONTAINER)[name] = adapter
        if site == "attention":
            layer.attention.register_forward_hook(functools.partial(_attention_hook, adapter=adapter))
        else:
            layer.mlp.register_forward_hook(functools.partial(_mlp_hook, adapter=adapter, scale=scale))
        paths.append(f"encoder.layer.{i}.{ADAPTER_CONTAINER}.{name}")
    return paths


def is_adapter_parameter(name: str) -> bool:
    """Whether a backbone parameter name belongs to an injected adapter."""
    return f".{ADAPTER_CONTAINER}." in f".{name}"


def freeze_all_but_adapters(backbone: nn.Module) -> None:
    """Freeze Dinov2's own parameters; leave adapter parameters trainable."""
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(is_adapter_parameter(name))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
