"""What every vprhub model shares: the transformers contract, initialisation of the backbone's
adapters, and the one function that chooses the trainable parameters."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, modeling_utils
from transformers.utils.hub import resolve_revision

from .adapters import adapter_modules, count_parameters

# Set as ``_auto_class``: saving writes the modeling code and ``auto_map`` (as ``register_for_auto_class``
# would), so every saved folder loads with ``trust_remote_code=True`` where vprhub is not installed.
MODEL_AUTO_CLASS = "AutoModel"


class VPRPreTrainedModel(PreTrainedModel):
    """Base of the vprhub models, on a transformers Dinov2 ``self.backbone``.

    * Attention: ``attn_implementation`` ``"eager"``, ``"sdpa"`` (default) or flash attention where
      installed; transformers passes it to the backbone config, whose layers honour it.
    * Initialisation: :meth:`_init_weights` is the one place, for the model's own modules and, through
      :meth:`_init_backbone_weights`, for the backbone's (Dinov2's rule, then :meth:`_init_adapter`
      for the injected adapters). transformers calls it on new models, on meta-device models in
      ``init_weights()`` and on the weights a checkpoint lacks in ``from_pretrained``.
    * Training: nothing is frozen here; :func:`mark_trainable` chooses the trainable parameters from
      :meth:`trainable_modules`.
    * Provenance: a model loaded from the Hub remembers the commit it was loaded from in
      ``config._commit_hash`` (not saved), so that its image processor comes from the same commit.
    """

    _auto_class = MODEL_AUTO_CLASS
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Dinov2Layer", "Dinov2WithRegistersLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """transformers' ``from_pretrained`` at one resolved commit, recorded in ``config._commit_hash``.

        Strict: a checkpoint that lacks some of the model's weights, holds others, or holds them in
        other shapes raises :class:`IncompleteWeightsError` instead of leaving weights randomly initialised.
        Who passes ``ignore_mismatched_sizes=True`` gets weights of another shape initialised anew (with a
        warning naming them); who asks for ``output_loading_info=True`` gets transformers' report and decides.
        """
        new_reshaped = bool(kwargs.get("ignore_mismatched_sizes", False))
        revision = resolve_revision(
            pretrained_model_name_or_path,
            kwargs.get("revision"),
            token=kwargs.get("token"),
            local_files_only=kwargs.get("local_files_only", False),
            cache_dir=kwargs.get("cache_dir"),
        )
        kwargs["revision"] = revision
        if kwargs.pop("output_loading_info", False):
            model, report = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
            model.config._commit_hash = getattr(revision, "resolved", None)
            return model, report
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reshaped weights reach the report, refused below
        with _without_load_report():  # the error below names the same weights
            model, report = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.config._commit_hash = getattr(revision, "resolved", None)
        _check_complete(model, report, new_reshaped)
        return model

    def _adopt_backbone(self, backbone: PreTrainedModel) -> PreTrainedModel:
        """Route the backbone's weight initialisation through this model (see :meth:`_init_backbone_weights`).

        The backbone (and its encoder) are transformers models of their own, so transformers initialises
        the modules inside them, adapters included, with their ``_init_weights``.
        """
        for module in backbone.modules():
            if isinstance(module, PreTrainedModel):
                module._init_weights = self._init_backbone_weights
        return backbone

    def _init_backbone_weights(self, module: nn.Module) -> None:
        """Dinov2's rule for a backbone module, then the adapter rule for modules of injected adapters."""
        type(self.backbone)._init_weights(self.backbone, module)
        for adapter in adapter_modules(self.backbone):
            if any(module is part for part in adapter.modules()):
                self._init_adapter(adapter, module)

    def _init_adapter(self, adapter: nn.Module, module: nn.Module) -> None:
        """Initialise ``module``, a part of ``adapter``, after Dinov2's rule did (nothing more by default)."""

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embedding (as transformers' Dinov2 answers)."""
        return self.backbone.get_input_embeddings()

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """One zero image at ``config.image_size``."""
        return {"pixel_values": torch.zeros(1, self.config.backbone_config.num_channels, *self.config.image_size)}

    def trainable_modules(self) -> list[nn.Module]:
        """The modules :func:`mark_trainable` trains (each model says which)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which modules it trains")


class IncompleteWeightsError(ValueError):
    """A checkpoint whose weights do not fit the model's config (missing, unexpected or reshaped)."""


def summarize_names(names: list[str], limit: int = 12) -> str:
    """``[a, b, ... and N more] (count)`` for an error message; ``none`` when empty."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... and {len(names) - limit} more' if len(names) > limit else ''}] ({len(names)})"


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Drop transformers' table of missing and unexpected weights (logged by ``from_pretrained``)."""
    drop_report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    logger = logging.getLogger(modeling_utils.__name__)
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def _check_complete(model: PreTrainedModel, report: dict, new_reshaped: bool = False) -> None:
    """Raise :class:`IncompleteWeightsError` when ``from_pretrained``'s ``report`` has missing, unexpected
    or (unless ``new_reshaped``, then logged) reshaped weights."""
    reshaped = sorted(key for key, *_ in report["mismatched_keys"])
    problems = {
        "missing": sorted(report["missing_keys"]),
        "unexpected": sorted(report["unexpected_keys"]),
        "of another shape": [] if new_reshaped else reshaped,
    }
    if any(problems.values()):
        found = "; ".join(f"{kind} {summarize_names(keys)}" for kind, keys in problems.items() if keys)
        hint = " (ignore_mismatched_sizes=True initialises them anew)" if problems["of another shape"] else ""
        raise IncompleteWeightsError(f"the weights do not fit its {model.config.model_type!r} config: {found}{hint}")
    if reshaped:
        logging.getLogger(__name__).warning(
            "initialised anew, the checkpoint holds them in another shape: %s", summarize_names(reshaped)
        )


def mark_trainable(model: VPRPreTrainedModel, frozen: Iterable[str] = ()) -> tuple[int, int]:
    """Make exactly ``model.trainable_modules()`` trainable, minus the submodules named in ``frozen``.

    The one place where vprhub freezes parameters (the trainer calls it; a loaded or new model has
    every parameter trainable, as any transformers model). The backbone's ``embeddings.mask_token``
    (used only for masked-image pre-training) is never trainable. Returns ``(trainable, total)``
    parameter counts.
    """
    excluded = [model.get_submodule(name) for name in frozen]
    model.requires_grad_(False)
    for module in model.trainable_modules():
        module.requires_grad_(True)
    for module in excluded:
        module.requires_grad_(False)
    mask_token = getattr(model.backbone.embeddings, "mask_token", None)
    if mask_token is not None:
        mask_token.requires_grad_(False)
    return count_parameters(model)


__all__ = ["IncompleteWeightsError", "VPRPreTrainedModel", "mark_trainable", "summarize_names"]
