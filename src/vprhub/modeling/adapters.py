"""Adapter injection into transformers' Dinov2 layers, without forking the layer code.

Adapters are registered as ``encoder.layer.<i>.adapters.<name>`` (so Dinov2's own parameters
keep their names and pretrained Dinov2 weights still load) and wired in with forward hooks
on the layer's submodules:

* ``"attention"``: the attention output ``a`` becomes ``adapter(a)`` (before the first
  layer scale) -- SelaVPR's serial adapter, which carries its own skip connection.
* ``"mlp"``: the MLP output becomes ``mlp(y) + scale * adapter(y)`` where ``y`` is the
  second norm's output (before the second layer scale) -- a parallel adapter.

Each layer's :class:`AdapterContainer` keeps the hook handles, as PEFT does: adapters can be
switched off for a while (:func:`disabled_adapters`) or removed for good (:func:`remove_adapters`).
Adapter modules and parameters are found by structure (the containers), never by name.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

AdapterSite = Literal["attention", "mlp"]
ADAPTER_SITES: tuple[str, ...] = ("attention", "mlp")
ADAPTER_CONTAINER = "adapters"


class AdapterContainer(nn.ModuleDict):
    """The adapters of one Dinov2 layer, by name, with the hook handles that wire them in."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.handles: dict[str, RemovableHandle] = {}


def _attention_hook(module: nn.Module, args: tuple, output: tuple, *, container: AdapterContainer, name: str) -> tuple:
    if not container.enabled:
        return output
    return (container[name](output[0]), *output[1:])


def _mlp_hook(
    module: nn.Module, args: tuple, output: torch.Tensor, *, container: AdapterContainer, name: str, scale: float
) -> torch.Tensor:
    if not container.enabled:
        return output
    return output + scale * container[name](args[0])


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
        if not isinstance(getattr(layer, ADAPTER_CONTAINER, None), AdapterContainer):
            layer.add_module(ADAPTER_CONTAINER, AdapterContainer())
        container = getattr(layer, ADAPTER_CONTAINER)
        container[name] = factory(i)
        if site == "attention":
            hook = functools.partial(_attention_hook, container=container, name=name)
            container.handles[name] = layer.attention.register_forward_hook(hook)
        else:
            hook = functools.partial(_mlp_hook, container=container, name=name, scale=scale)
            container.handles[name] = layer.mlp.register_forward_hook(hook)
        paths.append(f"encoder.layer.{i}.{ADAPTER_CONTAINER}.{name}")
    return paths


def adapter_containers(backbone: nn.Module) -> list[AdapterContainer]:
    """The adapter container of every layer that has one."""
    return [module for module in backbone.modules() if isinstance(module, AdapterContainer)]


def adapter_modules(backbone: nn.Module, name: str | None = None) -> list[nn.Module]:
    """The injected adapters (all, or those called ``name``), layer by layer."""
    return [
        adapter
        for container in adapter_containers(backbone)
        for adapter_name, adapter in container.items()
        if name is None or adapter_name == name
    ]


def adapter_parameter_names(backbone: nn.Module) -> set[str]:
    """Names (relative to ``backbone``) of the parameters that belong to injected adapters."""
    adapters = {id(container) for container in adapter_containers(backbone)}
    return {
        f"{prefix}.{name}"
        for prefix, module in backbone.named_modules()
        if id(module) in adapters
        for name, _ in module.named_parameters()
    }


@contextlib.contextmanager
def disabled_adapters(backbone: nn.Module) -> Iterator[None]:
    """Run ``backbone`` as the plain Dinov2 inside the ``with`` block; adapters come back afterwards."""
    containers = adapter_containers(backbone)
    states = [container.enabled for container in containers]
    for container in containers:
        container.enabled = False
    try:
        yield
    finally:
        for container, state in zip(containers, states):
            container.enabled = state


def remove_adapters(backbone: nn.Module) -> list[str]:
    """Unhook and delete every injected adapter (the backbone is the plain Dinov2 again); return their paths."""
    removed = []
    for prefix, layer in list(backbone.named_modules()):
        container = getattr(layer, ADAPTER_CONTAINER, None)
        if not isinstance(container, AdapterContainer):
            continue
        for handle in container.handles.values():
            handle.remove()
        removed += [f"{prefix}.{ADAPTER_CONTAINER}.{name}" for name in container]
        delattr(layer, ADAPTER_CONTAINER)
    return removed


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
