"""Registration with transformers' Auto classes and pipeline registry, done when transformers loads them.

``import vprhub`` must stay cheap, yet afterwards ``AutoConfig``, ``AutoModel`` and
``pipeline("place-recognition")`` must know the vprhub models. transformers imports its Auto
modules lazily (the first ``from transformers import AutoModel``); so does vprhub: each
registration runs right after the transformers module it fills is imported, or at once if it
already is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
AUTO_MODEL_MODULE = "transformers.models.auto.modeling_auto"
PIPELINES_MODULE = "transformers.pipelines"


def _register_configs(module: ModuleType) -> None:
    from .modeling import MODEL_TYPES, load_class

    for model_type, (config_class, _) in MODEL_TYPES.items():
        module.AutoConfig.register(model_type, load_class(config_class), exist_ok=True)


def _register_models(module: ModuleType) -> None:
    from .modeling import MODEL_TYPES, load_class

    for config_class, model_class in MODEL_TYPES.values():
        module.AutoModel.register(load_class(config_class), load_class(model_class), exist_ok=True)


def _register_pipeline(module: ModuleType) -> None:
    # vprhub.pipelines registers the task at the end of its import; it may be the very import that
    # loads transformers.pipelines, and then it is already (partly) in sys.modules.
    importlib.import_module("vprhub.pipelines")


class _HookedLoader(importlib.abc.Loader):
    """A module's own loader, then ``hook(module)`` once the module is executed."""

    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[ModuleType], None]) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        self.hook(module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the watched modules so that their hook runs after them."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname, path, target=None):
        hook = self.hooks.pop(fullname, None)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _HookedLoader(spec.loader, hook)
                return spec
        return None


_FINDER = _AfterImport()


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Run ``hook(module)`` after module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        hook(sys.modules[name])
        return
    _FINDER.hooks[name] = hook
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_with_transformers() -> None:
    """Register the model types with ``AutoConfig``/``AutoModel`` and the ``place-recognition`` task."""
    when_imported(AUTO_CONFIG_MODULE, _register_configs)
    when_imported(AUTO_MODEL_MODULE, _register_models)
    when_imported(PIPELINES_MODULE, _register_pipeline)
