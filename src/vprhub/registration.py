"""Registration with transformers' Auto classes and pipeline registry, done when transformers loads them.

``import vprhub`` must stay cheap, yet afterwards ``AutoConfig``, ``AutoModel``, ``AutoImageProcessor``
and ``pipeline("place-recognition")`` must know the vprhub models. transformers imports its Auto
modules lazily (the first ``from transformers import AutoModel``); so does vprhub: each
registration runs right after the transformers module it fills is imported (or at once if it
already is), by a post-import hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
AUTO_MODEL_MODULE = "transformers.models.auto.modeling_auto"
AUTO_IMAGE_PROCESSOR_MODULE = "transformers.models.auto.image_processing_auto"
PIPELINES_MODULE = "transformers.pipelines"
MODELING_PACKAGE = "vprhub.modeling"
_DONE: set[int] = set()  # ids of the transformers Auto modules registered with


def _initializing(module: ModuleType | None) -> bool:
    """Whether ``module`` is still executing its import (importlib marks its spec so)."""
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _modeling_initializing() -> bool:
    return any(_initializing(m) for name, m in list(sys.modules.items()) if name.startswith(MODELING_PACKAGE + "."))


def _register_auto_classes(_: ModuleType | None = None) -> None:
    """Register configs with ``AutoConfig``, models with ``AutoModel`` and the image processor with
    ``AutoImageProcessor``, each once its Auto module is loaded.

    Runs after the transformers Auto modules and after every vprhub modeling module is imported:
    a registration waits while a vprhub modeling module is mid-import (transformers may import
    its Auto modules from inside it), and is done again if transformers' module is imported anew.
    """
    if _modeling_initializing():
        return
    for module_name, register in (
        (AUTO_CONFIG_MODULE, _register_configs),
        (AUTO_MODEL_MODULE, _register_models),
        (AUTO_IMAGE_PROCESSOR_MODULE, _register_image_processor),
    ):
        module = sys.modules.get(module_name)
        if module is not None and not _initializing(module) and id(module) not in _DONE:
            register(module)
            _DONE.add(id(module))


def _register_configs(configuration_auto: ModuleType) -> None:
    from .modeling import MODEL_TYPES, load_class

    for model_type, (config_class, _) in MODEL_TYPES.items():
        configuration_auto.AutoConfig.register(model_type, load_class(config_class), exist_ok=True)


def _register_models(modeling_auto: ModuleType) -> None:
    from .modeling import MODEL_TYPES, load_class

    for config_class, model_class in MODEL_TYPES.values():
        modeling_auto.AutoModel.register(load_class(config_class), load_class(model_class), exist_ok=True)


def _register_image_processor(image_processing_auto: ModuleType) -> None:
    """The one (Pillow) processor for every backend: asking for torchvision must not give other pixels."""
    from .modeling import IMAGE_PROCESSOR_CLASS, MODEL_TYPES, load_class

    processor = load_class(IMAGE_PROCESSOR_CLASS)
    for config_class, _ in MODEL_TYPES.values():
        image_processing_auto.AutoImageProcessor.register(
            load_class(config_class), image_processor_classes={"pil": processor, "torchvision": processor}, exist_ok=True
        )


def _register_pipeline(_: ModuleType | None = None) -> None:
    """vprhub.pipelines registers the task at the end of its own import (it may be the import that
    loads transformers.pipelines); here it is imported, or asked again for a new transformers.pipelines."""
    pipelines = sys.modules.get("vprhub.pipelines")
    if pipelines is None:
        importlib.import_module("vprhub.pipelines")
    elif not _initializing(pipelines):
        pipelines.register_pipeline()


class _HookedLoader(importlib.abc.Loader):
    """A module's own loader, then its hook once the module is executed."""

    def __init__(self, loader: importlib.abc.Loader, finder: _AfterImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        module.__spec__._initializing = False  # executed: importlib would only clear it after this returns
        self.finder.hooks[module.__name__](module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the watched modules so that their hook runs after them."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname, path, target=None):
        # Hooks stay registered: a spec may be looked up (importlib.util.find_spec) without the
        # module being imported, and a module dropped from sys.modules may be imported again.
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _HookedLoader(spec.loader, self)
                return spec
        return None


_FINDER = _AfterImport()


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Run ``hook(module)`` after module ``name`` is imported, now if it already is, and again if it
    is ever imported anew (``hook`` must be idempotent)."""
    _FINDER.hooks[name] = hook
    if name in sys.modules:
        hook(sys.modules[name])
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_with_transformers() -> None:
    """Register the model types with ``AutoConfig``/``AutoModel``/``AutoImageProcessor`` and the
    ``place-recognition`` task."""
    modeling_dir = Path(__file__).resolve().parent / "modeling"
    for name in [AUTO_CONFIG_MODULE, AUTO_MODEL_MODULE, AUTO_IMAGE_PROCESSOR_MODULE, *(f"{MODELING_PACKAGE}.{p.stem}" for p in modeling_dir.glob("*.py"))]:
        when_imported(name, _register_auto_classes)
    when_imported(PIPELINES_MODULE, _register_pipeline)
