"""The Hub: model cards from ``hub_cards/``, folders that carry their modeling code, one-commit pushes.

Pulling needs nothing from here: ``AutoModel.from_pretrained(repo_id)`` (with vprhub
installed) or ``AutoModel.from_pretrained(repo_id, trust_remote_code=True)`` (without): every
vprhub model, however it was made, saves its modeling code and ``auto_map`` beside its config.

The provenance arguments of :func:`render_model_card` and :func:`push_model`:

* ``eval_results``: the report written by ``vprhub eval --json`` (a path or the loaded
  dict, whose ``"datasets"`` maps each dataset to its results), or directly
  ``{dataset: {"recall@1": 0.91, "recall@5": ..., ...}}``; recalls are fractions in [0, 1],
  shown in percent.
* ``conversion``: ``{"checkpoint": <official file name>, "source": <URL, optional>,
  "parity": {<figure>: <value>, ...} (optional), "trained_on": [<dataset>, ...] (optional,
  defaults to the official training data named by the template), <other detail>: <value>, ...}``.
* ``training``: ``{"dataset": <training set>, <hyper-parameter>: <value>, ...}``.

Exactly one of ``conversion`` and ``training`` says where the weights come from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import PreTrainedConfig, PreTrainedModel

from . import __version__
from .modeling.configuration_common import MIN_TRANSFORMERS_VERSION

CARDS_DIR = Path(__file__).resolve().parent / "hub_cards"  # a link to the repository's hub_cards/
# (hidden size, depth) of the released DINOv2 ViTs -> size name of their Hub ids.
DINOV2_SIZES = {(384, 12): "small", (768, 12): "base", (1024, 24): "large", (1536, 40): "giant"}
DINOV2_HUB_IDS = {"dinov2": "facebook/dinov2-{}", "dinov2_with_registers": "facebook/dinov2-with-registers-{}"}
RECALL_KEY = re.compile(r"^recall@(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Files of an earlier push that this push's files replace (stale shards, old modeling code).
REPLACED_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.py"]
PIPELINE_TAG = "image-feature-extraction"
TEMPLATE_FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n", re.DOTALL)


def _template(model_type: str) -> tuple[dict, str, Path]:
    """The static metadata (front matter) and the Jinja body of ``hub_cards/<model_type>.md``."""
    path = CARDS_DIR / f"{model_type}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no model card template for {model_type!r}: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    match = TEMPLATE_FRONT_MATTER.match(text)
    if match is None:
        raise ValueError(f"{path} must start with a YAML front matter block (---)")
    return yaml.safe_load(match.group(1)), text[match.end() :], path


def _field_docs(config_class: type) -> dict[str, str]:
    """``{argument: description}`` from the config docstrings (``name (`type`, ...): text`` entries).

    Parent classes are read first, so a subclass (MegaLoc's config of SALAD's) documents only what it changes.
    """
    docs: dict[str, str] = {}
    current, indent = None, 0
    docstrings = (klass.__dict__.get("__doc__") or "" for klass in reversed(config_class.__mro__))
    for line in "\n\n".join(docstrings).splitlines():  # the blank line between two docstrings ends an entry
        entry = re.match(r"^(\s*)(\w+) \(`[^`]*`[^)]*\):\s*(.*)$", line)
        if entry:
            current, indent = entry.group(2), len(entry.group(1))
            docs[current] = entry.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _config_rows(config: PreTrainedConfig) -> list[dict[str, str]]:
    """Name, value and description of every model-specific config field but the backbone's."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {"backbone_config", "vprhub_version"}
    docs = _field_docs(type(config))
    return [
        {
            "name": f.name,
            "value": json.dumps(getattr(config, f.name), default=str),
            "doc": docs.get(f.name, "").replace("|", "\\|"),
        }
        for f in dataclasses.fields(type(config))
        if f.name not in base
    ]


def _backbone(config: PreTrainedConfig) -> dict[str, Any]:
    """Summary of the nested Dinov2 config, with the Hub id of the released ViT it matches."""
    backbone = config.backbone_config
    size = DINOV2_SIZES.get((backbone.hidden_size, backbone.num_hidden_layers))
    template = DINOV2_HUB_IDS.get(backbone.model_type)
    return {
        "model_type": backbone.model_type,
        "hidden_size": backbone.hidden_size,
        "num_hidden_layers": backbone.num_hidden_layers,
        "num_attention_heads": backbone.num_attention_heads,
        "patch_size": backbone.patch_size,
        "num_register_tokens": getattr(backbone, "num_register_tokens", 0),
        "base_model": template.format(size) if size and template else None,
    }


def _preprocessing(config: PreTrainedConfig, processor: Any | None) -> dict[str, Any]:
    """Input size and normalisation: the processor's when given, else the config's image size."""
    if processor is None:
        height, width = config.image_size
        return {"height": height, "width": width, "mean": None, "std": None}
    size = processor.size
    if "height" not in size or "width" not in size:
        raise ValueError(f"the image processor resizes to {dict(size)}; a vprhub model needs an exact height and width")
    normalise = getattr(processor, "do_normalize", False)
    mean, std = (
        [round(float(x), 4) for x in values] if normalise else None
        for values in (processor.image_mean, processor.image_std)
    )
    return {"height": size["height"], "width": size["width"], "mean": mean, "std": std}


def load_eval_results(eval_results: str | os.PathLike | Mapping) -> dict[str, dict[int, float]]:
    """``{dataset: {K: recall fraction}}`` from an eval report (path or dict), validated."""
    source = "eval results"
    if isinstance(eval_results, (str, os.PathLike)):
        source = str(eval_results)
        try:
            eval_results = json.loads(Path(eval_results).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the eval results {source}: {error}") from None
    if not isinstance(eval_results, Mapping):
        raise ValueError(f"{source} must be a mapping, got {type(eval_results).__name__}")
    datasets = eval_results.get("datasets", eval_results)
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError(f"{source} holds no datasets")
    results: dict[str, dict[int, float]] = {}
    for dataset, metrics in datasets.items():
        recalls = {
            int(m.group(1)): value
            for key, value in (metrics.items() if isinstance(metrics, Mapping) else [])
            if (m := RECALL_KEY.match(key))
        }
        if not recalls:
            raise ValueError(f"{source}: dataset {dataset!r} has no recall@K values")
        for k, value in recalls.items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{source}: recall@{k} of {dataset!r} is {value!r}, expected a fraction in [0, 1]")
        results[str(dataset)] = dict(sorted(recalls.items()))
    return results


def _provenance(conversion: Mapping | None, training: Mapping | None) -> dict[str, Any]:
    """Where the weights come from: exactly one of ``conversion`` (needs "checkpoint") or ``training`` ("dataset")."""
    if (conversion is None) == (training is None):
        raise ValueError("a model card says where the weights come from: pass exactly one of conversion= or training=")
    if conversion is not None:
        kind, info, required = "conversion", conversion, "checkpoint"
    else:
        kind, info, required = "training", training, "dataset"
    if not isinstance(info, Mapping) or not info.get(required):
        raise ValueError(f"{kind} must be a mapping with a non-empty {required!r} entry, got {info!r}")
    details = {k: v for k, v in info.items() if k not in (required, "source", "parity")}
    parity = info.get("parity")
    if parity is not None and not isinstance(parity, Mapping):
        raise ValueError(f"conversion['parity'] must be a mapping of figures, got {parity!r}")
    return {"kind": kind, required: info[required], "source": info.get("source"), "details": details, "parity": parity}


def _card_data(meta: dict, model_name: str, backbone: dict, results: dict, provenance: dict) -> ModelCardData:
    """The YAML metadata: library, license, tags, base model, datasets and ``model-index``."""
    eval_results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Visual place recognition",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=f"recall@{k}",
            metric_name=f"Recall@{k}",
            metric_value=round(100 * value, 2),
        )
        for dataset, recalls in results.items()
        for k, value in recalls.items()
    ]
    if provenance["kind"] == "training":
        datasets = [provenance["dataset"]]
    else:
        datasets = list(provenance["details"].get("trained_on") or meta["official_training_data"])
    return ModelCardData(
        library_name="transformers",
        license=meta["license"],
        tags=["vprhub", "visual-place-recognition", "dinov2", *meta.get("tags", [])],
        pipeline_tag=PIPELINE_TAG,
        base_model=backbone["base_model"],
        datasets=datasets,
        metrics=["recall"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    processor: Any | None = None,
    eval_results: str | os.PathLike | Mapping | None = None,
    conversion: Mapping | None = None,
    training: Mapping | None = None,
) -> str:
    """The README.md of ``repo_id`` for ``model``, from ``hub_cards/<model_type>.md`` and the real config.

    Raises ``ValueError`` when a template field cannot be filled (never leaves a placeholder).
    """
    config = model.config
    meta, body, path = _template(config.model_type)
    provenance = _provenance(conversion, training)
    results = load_eval_results(eval_results) if eval_results is not None else {}
    backbone = _backbone(config)
    model_name = repo_id.rstrip("/").split("/")[-1]
    context = {
        "repo_id": repo_id,
        "model_name": model_name,
        "model_type": config.model_type,
        "meta": meta,
        "config": config,
        "descriptor_dim": config.descriptor_dim,
        "backbone": backbone,
        "config_rows": _config_rows(config),
        "preprocessing": _preprocessing(config, processor),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "provenance": provenance,
        "results": results,
        "k_values": sorted({k for recalls in results.values() for k in recalls}),
        "vprhub_version": __version__,
        "min_transformers_version": MIN_TRANSFORMERS_VERSION,
    }
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(CARDS_DIR), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    try:
        text = environment.from_string(body).render(**context)
    except jinja2.UndefinedError as error:
        raise ValueError(f"model card template {path} has a field that cannot be filled: {error}") from None
    leftover = re.search(r"\{\{|\{%|\{#", text)
    if leftover:
        line = text[: leftover.start()].count("\n") + 1
        raise ValueError(f"model card of {repo_id} still holds a template marker {leftover.group()!r} on line {line}")
    card_data = _card_data(meta, model_name, backbone, results, provenance)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{text}"))


def push_model(
    model: PreTrainedModel,
    processor: Any,
    repo_id: str,
    *,
    eval_results: str | os.PathLike | Mapping | None = None,
    conversion: Mapping | None = None,
    training: Mapping | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Push weights, config, modeling code, image processor and model card in one commit; return its URL.

    The card is rendered first, so a card that cannot be filled fails before anything is sent.
    ``revision`` names a branch, created from ``main`` if needed.
    """
    card_args = dict(processor=processor, eval_results=eval_results, conversion=conversion, training=training)
    card = render_model_card(model, repo_id, **card_args)
    api = HfApi(token=token)
    created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if created != repo_id:  # a name without namespace went to the token's user
        repo_id, card = created, render_model_card(model, created, **card_args)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vprhub-push-") as folder:
        model.save_pretrained(folder)  # with its modeling code and auto_map (VPRPreTrainedModel._auto_class)
        processor.save_pretrained(folder)
        Path(folder, "README.md").write_text(card, encoding="utf-8")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {model.config.model_type} model, image processor and card",
            delete_patterns=REPLACED_PATTERNS,
        )
    return commit.commit_url


def check_saved_folder(folder: str | os.PathLike) -> Path:
    """Raise ``FileNotFoundError`` naming what a ``save_pretrained`` folder of a vprhub model lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    index = folder / WEIGHT_FILES[1]
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += sorted(shard for shard in shards if not (folder / shard).is_file())
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete vprhub model folder: missing {', '.join(missing)}")
    return folder


def push_folder(folder: str | os.PathLike, repo_id: str, **push_kwargs: Any) -> str:
    """Load a saved model folder (config, weights, image processor) and :func:`push_model` it."""
    from .loading import load_model_and_processor

    model, processor = load_model_and_processor(check_saved_folder(folder), "model folder")
    return push_model(model, processor, repo_id, **push_kwargs)


__all__ = [
    "check_saved_folder",
    "load_eval_results",
    "push_folder",
    "push_model",
    "render_model_card",
]
