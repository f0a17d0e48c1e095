"""The embedding engine: the one path from images to descriptors (and SelaVPR local features).

Index building, ``vprhub eval``, the trainer's evaluation, the ``place-recognition`` pipeline
and the service all call :class:`Embedder`:

* workers open images with :func:`vprhub.image_io.open_image` (EXIF, 16-bit, JPEG draft,
  bombs refused) and resize them to uint8 ``[H, W, 3]``; rescaling, normalisation and the
  dtype conversion run on the model's device (pinned memory and non-blocking copies on CUDA);
* batching rule: inputs are cut into shards of ``shard_size`` (a multiple of ``batch_size``);
  inside a shard, consecutive *readable* images in input order form batches of exactly
  ``batch_size`` (the last of a shard may be smaller). Without unreadable inputs this is
  plain consecutive batching, the official evaluations' rule, which matters for CricaVPR's
  batch-dependent descriptors; a run split over processes or resumed batches identically;
* precision: ``float32`` (the parity mode), ``bfloat16`` / ``float16`` weights, or
  ``autocast-bfloat16`` / ``autocast-float16``; optional attention implementation (``sdpa``)
  and ``torch.compile``; the settings are part of :meth:`Embedder.settings` and of every store key;
* outputs: in memory (:meth:`Embedder.embed`), streamed shard by shard
  (:meth:`Embedder.stream`), or into a resumable on-disk :class:`DescriptorStore`
  (:meth:`Embedder.embed_to_store`), shared among processes by ``process_index`` /
  ``num_processes`` (shard ``i`` belongs to process ``i % num_processes``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .allocator import retain_freed_memory
from .descriptor_store import DescriptorStore, Shard
from .image_io import UnreadableImageError, decode_resized, describe, open_image
from .modeling.image_processing import RESIZE_RULES

PRECISIONS = ("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16")
DEFAULT_SHARD_BATCHES = 64  # a shard holds this many batches unless told otherwise
# Config entries that describe how a model was saved or called, not what it computes.
_BOOKKEEPING_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "custom_pipelines",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)
_PROCESSOR_CLASS_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "auto_map"})
_PROBE_SIZE = 64


# ---------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """An exact-size image processor split in two: uint8 resizing on the CPU, the rest on the device.

    ``from_processor`` reads a transformers image processor that resizes to a fixed
    ``height x width`` and rescales / normalises (the VPR processor and the ViT family);
    other processors run whole in the workers (:class:`ProcessorPreprocessing`).
    """

    size: tuple[int, int]
    resample: int
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_rule: str = "pil_antialias"  # see vprhub.modeling.image_processing.RESIZE_RULES

    @staticmethod
    def from_processor(image_processor: Any) -> Preprocessing | ProcessorPreprocessing:
        settings = image_processor.to_dict()
        size = settings.get("size") or {}
        exact = (
            settings.get("do_resize", False)
            and {"height", "width"} <= set(size)
            and not settings.get("do_center_crop")
            and not settings.get("do_pad")
            and settings.get("do_convert_rgb") is not False
        )
        if not exact:
            return ProcessorPreprocessing(image_processor)
        scale = float(settings["rescale_factor"]) if settings.get("do_rescale") else 1.0
        normalize = settings.get("do_normalize")
        return Preprocessing(
            size=(int(size["height"]), int(size["width"])),
            resample=int(settings.get("resample", Image.BILINEAR)),
            scale=scale,
            mean=tuple(float(v) for v in settings["image_mean"]) if normalize else (0.0, 0.0, 0.0),
            std=tuple(float(v) for v in settings["image_std"]) if normalize else (1.0, 1.0, 1.0),
            resize_rule=_resize_rule(settings.get("resize_rule", "pil_antialias")),
        )

    def decode(self, source: Any, timeout: float | None = None) -> np.ndarray:
        """``[H, W, 3]`` at the model's size: uint8 (Pillow resize), or float32 for the ``tensor_bilinear``
        rule: the full-size image resized as floats without antialiasing. That equals the official
        normalise-then-resize, because the normalisation is affine per channel and bilinear weights sum to 1."""
        if self.resize_rule == "pil_antialias":
            return decode_resized(source, self.size, self.resample, timeout)
        full = torch.from_numpy(np.asarray(open_image(source, timeout=timeout), dtype=np.float32)).permute(2, 0, 1)
        resized = torch.nn.functional.interpolate(
            full[None], size=self.size, mode="bilinear", align_corners=False, antialias=False
        )
        return np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy())

    def to_model(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (or float) ``[B, H, W, 3]`` -> normalised ``pixel_values`` ``[B, 3, H, W]`` on ``device``."""
        pixels = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
        x = torch.empty(pixels.shape, dtype=torch.float32, device=device)  # contiguous, unlike a permuted .float()
        x.copy_(pixels)
        mean, std = _channel_constants(self.mean, device), _channel_constants(self.std, device)
        return x.mul_(self.scale).sub_(mean).div_(std).to(dtype)  # in place: one float copy of the batch


@functools.cache
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as ``[1, C, 1, 1]`` on ``device``, made once: a copy from the host per batch would
    wait for the GPU to finish the batch before."""
    with torch.inference_mode(False):
        return torch.tensor(values, device=device).view(1, -1, 1, 1)


def _resize_rule(rule: str) -> str:
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize_rule {rule!r} in the image processor; expected one of {RESIZE_RULES}")
    return rule


@dataclass(frozen=True)
class ProcessorPreprocessing:
    """Any other image processor, run whole in the workers (float ``[3, H, W]`` per image)."""

    image_processor: Any

    @property
    def size(self) -> None:
        """Not known ahead: the processor decides (images are decoded at full size)."""
        return None

    def decode(self, source: Any, timeout: float | None = None) -> np.ndarray:
        pixels = self.image_processor(images=open_image(source, timeout=timeout), return_tensors="np")["pixel_values"][0]
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def to_model(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return pixels.to(device, non_blocking=True).to(dtype)


class _DecodedImages(Dataset):
    """Item ``i``: ``(i, pixels or None, error or None)``; never raises for a bad input."""

    def __init__(
        self, inputs: Sequence[Any], preprocessing: Preprocessing | ProcessorPreprocessing, timeout: float | None
    ) -> None:
        self.inputs, self.preprocessing, self.timeout = inputs, preprocessing, timeout

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, self.preprocessing.decode(self.inputs[i], self.timeout), None
        except UnreadableImageError as err:
            return i, None, str(err)


def _collate(items: list[tuple[int, np.ndarray | None, str | None]]) -> dict:
    """One batch; in a worker, torch's collation stacks straight into shared memory (no second copy)."""
    readable = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    return {
        "rows": [i for i, _ in readable],
        "pixels": default_collate([torch.from_numpy(p) for _, p in readable]) if readable else None,
        "errors": [(i, error) for i, _, error in items if error is not None],
    }


class DatasetImages(Sequence):
    """The ``column`` of a ``datasets.Dataset`` as a sequence of engine inputs, read row by row
    (undecoded, so workers open the bytes: ``Embedder.stream(DatasetImages(ds))``)."""

    def __init__(self, dataset: Any, column: str = "image") -> None:
        import datasets

        if column not in dataset.features:
            raise ValueError(f"no column {column!r}; columns are {list(dataset.features)}")
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


# ---------------------------------------------------------------------------- identity
def config_hash(config: Any) -> str:
    """SHA-256 of a model config without its bookkeeping entries (paths, versions, dtype)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if k not in _BOOKKEEPING_KEYS}
        return value

    blob = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def processor_signature(image_processor: Any) -> dict:
    """The image processor's settings as plain JSON (class names and code references left out: PIL
    and torch backends of the same settings are interchangeable). ``do_convert_rgb=True`` is left
    out too: the engine converts every image to RGB itself, so it changes nothing here."""
    settings = json.loads(image_processor.to_json_string())
    if settings.get("do_convert_rgb"):
        del settings["do_convert_rgb"]
    return {k: v for k, v in settings.items() if k not in _PROCESSOR_CLASS_KEYS}


def weights_digest(model: torch.nn.Module) -> str:
    """BLAKE2b of every tensor of the model's state (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def probe_images() -> list[Image.Image]:
    """Two fixed images whose descriptors fingerprint a model + preprocessing."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, _PROBE_SIZE)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)
    noise = rng.integers(0, 256, (_PROBE_SIZE, _PROBE_SIZE, 3))
    return [Image.fromarray(a.astype(np.uint8)) for a in (smooth, noise)]


def file_signature(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of the inputs' absolute paths, sizes and modification times: changes when a file is replaced."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            line = f"{Path(path).absolute()}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
        except OSError:
            line = f"{Path(path).absolute()}\tmissing\n"
        digest.update(line.encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- results
@dataclass
class Embeddings:
    """Descriptors ``[N, D]`` float32 (and local features ``[N, h, w, C]``) of N images, in order."""

    descriptors: np.ndarray
    local_features: np.ndarray | None = None


@dataclass
class EmbeddingReport:
    """What a run did: inputs seen, embedded, skipped (with reasons), seconds, images/s, settings."""

    images: int = 0
    embedded: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"embedded {self.embedded} of {self.images} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s), {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {s['input']}: {s['error']}" for s in self.skipped]
        return "\n".join(lines)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def precision_of(model: torch.nn.Module) -> str:
    """The precision that runs ``model`` as it is: its weights' dtype (no cast, no autocast)."""
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def default_num_workers() -> int:
    """One decoding worker per available core (the main process mostly waits on the model)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------- the engine
class Embedder:
    """Images -> descriptors with one model; see the module docstring for the rules.

    Args:
        model: a vprhub model (``model(pixel_values=...).descriptors`` ``[B, D]``, optionally
            ``.local_features``); it is put in eval mode and moved (and, for ``bfloat16`` /
            ``float16``, cast) to ``device`` in place.
        image_processor: the model's image processor; default: the VPR processor at
            ``model.config.image_size``.
        device: where the model runs (default: where it is).
        precision: one of :data:`PRECISIONS`.
        attention: an attention implementation to set (``"sdpa"``, ``"eager"``); ``None`` keeps the model's.
        compile: ``True`` or a backend name runs the model through ``torch.compile``.
        batch_size: images per forward pass.
        num_workers: decoding processes for file inputs (default: one per core); 0 decodes in
            this process. On CPU the workers run at the lowest scheduling priority, so the
            model keeps every core and the workers fill the time it leaves.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any = None,
        *,
        device: str | torch.device | None = None,
        precision: str = "float32",
        attention: str | None = None,
        compile: bool | str = False,
        batch_size: int = 32,
        num_workers: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_processor is None:
            from .modeling.image_processing import vpr_image_processor

            image_processor = vpr_image_processor(*model.config.image_size)
        self.image_processor = image_processor
        self.preprocessing = Preprocessing.from_processor(image_processor)
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cpu":
            retain_freed_memory()
        self.precision, self.attention, self.compile = precision, attention, compile
        self._autocast = precision.startswith("autocast-")
        dtype = getattr(torch, precision.removeprefix("autocast-"))
        self.compute_dtype = dtype
        self.input_dtype = torch.float32 if self._autocast else dtype
        if attention is not None:
            _set_attention(model, attention)
        model.eval()
        model.to(self.device)
        if not self._autocast:
            model.to(dtype)
        self.model = model
        self._run_model = (
            torch.compile(model, **({"backend": compile} if isinstance(compile, str) else {})) if compile else model
        )
        self._identity: dict | None = None

    # ------------------------------------------------------------------ facts
    @property
    def settings(self) -> dict:
        """The precision / speed settings, recorded with every output."""
        return {
            "precision": self.precision,
            "attention": self.attention,
            "compile": self.compile,
            "batch_size": self.batch_size,
            "device": str(self.device),
        }

    def identity(self) -> dict:
        """The model fingerprint: name (and Hub commit), type, config hash, descriptor width, preprocessing,
        weight digest and probe descriptors (two fixed images; they let an index refuse a query
        model with other weights while tolerating another precision)."""
        if self._identity is None:
            pixels = torch.from_numpy(np.stack([self.preprocessing.decode(image) for image in probe_images()]))
            # Through the uncompiled model: a 2-image batch would make torch.compile compile again.
            probe, _ = _to_numpy(self._launch([pixels], False, self.model))
            config = getattr(self.model, "config", None)
            self._identity = {
                "name_or_path": _model_reference(getattr(self.model, "name_or_path", None)),
                "revision": _hub_revision(self.model),
                "model_type": getattr(config, "model_type", None),
                "config_hash": config_hash(config) if config is not None else None,
                "descriptor_dim": int(probe.shape[1]),
                "image_processor": processor_signature(self.image_processor),
                "weights": weights_digest(self.model),
                "probe": probe.round(6).tolist(),
            }
        return self._identity

    def store_key(self, paths: Sequence[str | os.PathLike], local_features: bool) -> dict:
        """What a store of ``paths`` depends on: model identity, settings, local features and
        the files' paths, sizes and modification times (a replaced file changes the key)."""
        return {
            "identity": self.identity(),
            "settings": self.settings,
            "local_features": bool(local_features),
            "inputs": file_signature(paths),
        }

    # ------------------------------------------------------------------ one batch
    def forward(self, pixels: torch.Tensor, local_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Model outputs of one batch of decoded pixels (uint8 ``[B, H, W, 3]``, or the
        processor's float ``[B, 3, H, W]``): descriptors float32 ``[B, D]`` and, when asked,
        local features float32 ``[B, h, w, C]``."""
        return _to_numpy(self._launch([pixels], local_features))

    def _launch(
        self, parts: list[torch.Tensor], local_features: bool, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Start the model (default: the compiled one, if compiled) on the concatenated ``parts``;
        outputs stay on the device (see :class:`_HostCopy`)."""
        count = sum(len(p) for p in parts)
        if not count:
            raise ValueError("cannot embed an empty batch")
        if self.device.type == "cuda":  # one copy into pinned memory, then a non-blocking transfer
            pixels = torch.empty((count, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
            torch.cat(parts, out=pixels)
        else:
            pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype) if self._autocast else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            pixel_values = self.preprocessing.to_model(pixels, self.device, self.input_dtype)
            output = (self._run_model if model is None else model)(pixel_values=pixel_values)
        descriptors = getattr(output, "descriptors", None)
        if descriptors is None or descriptors.ndim != 2 or len(descriptors) != count:
            raise ValueError(
                f"{type(self.model).__name__} must return `descriptors` [B, D] for B={count} images, got "
                f"{None if descriptors is None else list(descriptors.shape)}"
            )
        local = None
        if local_features:
            local = getattr(output, "local_features", None)
            if local is None:
                raise ValueError(
                    f"{type(self.model).__name__} returns no `local_features`; re-ranking needs a model that does"
                )
        return descriptors, local

    # ------------------------------------------------------------------ in memory
    def embed(
        self,
        images: Sequence[Any],
        local_features: bool = False,
        batch_size: int | None = None,
        num_workers: int = 0,
        timeout: float | None = None,
    ) -> Embeddings:
        """Embed ``images`` (paths, URLs, bytes, PIL images, arrays) in memory, in order.

        The in-memory API of the pipeline and the service: consecutive batches of
        ``batch_size`` (default: the engine's); any unreadable input raises
        :class:`~vprhub.image_io.UnreadableImageError` naming it. ``timeout``: seconds per URL.
        """
        images = list(images)
        if not images:
            raise ValueError("no images given")
        batch_size = self.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
        (shard,) = self._shards(
            images, [(0, range(len(images)))], local_features, num_workers, True, False, "", batch_size, timeout
        )
        return Embeddings(np.asarray(shard.descriptors), shard.local_features)

    def stream(
        self,
        inputs: Sequence[Any],
        local_features: bool = False,
        shard_size: int | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
        desc: str = "embedding",
    ) -> Iterator[Shard]:
        """Embed this process's shards of ``inputs``, yielding them in order; unreadable inputs
        are skipped and listed in ``Shard.skipped``. Sets :attr:`report` when done."""
        shard_size = self._shard_size(shard_size)
        shards = [(i, r) for i, r in enumerate(_shard_ranges(len(inputs), shard_size)) if i % num_processes == process_index]
        yield from self._shards(inputs, shards, local_features, self.num_workers, False, progress, desc)


    def embed_to_store(
        self,
        inputs: Sequence[str | os.PathLike],
        path: str | os.PathLike,
        local_features: bool = False,
        shard_size: int | None = None,
        dtype: str = "float32",
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
        desc: str = "embedding",
    ) -> DescriptorStore:
        """Embed the image files ``inputs`` into the store at ``path``, out of core and resumable.

        Shards already in the store (from a killed or parallel run with the same model,
        settings and unchanged files) are kept; the others are embedded and written
        atomically. With several processes, each call embeds shards ``i`` with
        ``i % num_processes == process_index``; the finished store is identical to a
        one-process store. Sets :attr:`report` (for this process's share).
        """
        inputs = list(inputs)
        if not inputs:
            raise ValueError("no images given")
        shard_size = self._shard_size(shard_size)
        store = DescriptorStore.create(path, self.store_key(inputs, local_features), len(inputs), shard_size, dtype)
        mine = {i for i in range(store.num_shards) if i % num_processes == process_index}
        store.remove_stale(mine)
        todo = [(i, store.shard_rows(i)) for i in sorted(mine - store.finished())]
        for shard in self._shards(inputs, todo, local_features, self.num_workers, False, progress, desc):
            store.write(shard)
        return store

    # ------------------------------------------------------------------ the loop
    def _shard_size(self, shard_size: int | None) -> int:
        if shard_size is None:
            return self.batch_size * DEFAULT_SHARD_BATCHES
        shard_size = _positive_int("shard_size", shard_size)
        if shard_size % self.batch_size:
            raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({self.batch_size})")
        return shard_size

    def _shards(
        self,
        inputs: Sequence[Any],
        shards: list[tuple[int, range]],
        local_features: bool,
        num_workers: int,
        strict: bool,
        progress: bool,
        desc: str,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Shard]:
        from tqdm.auto import tqdm

        batch_size = batch_size or self.batch_size
        self.report = report = EmbeddingReport(images=sum(len(r) for _, r in shards), settings=self.settings)
        if not shards:
            return
        chunks = [list(r[i : i + batch_size]) for _, r in shards for i in range(0, len(r), batch_size)]
        loader = DataLoader(
            _DecodedImages(inputs, self.preprocessing, timeout),
            batch_sampler=chunks,
            num_workers=num_workers,
            collate_fn=_collate,
            prefetch_factor=4 if num_workers else None,
            worker_init_fn=_yield_to_the_model if self.device.type == "cpu" else None,
        )
        start = time.perf_counter()
        batches = iter(loader)
        with tqdm(total=report.images, desc=desc, unit="img", disable=not progress, smoothing=0.1) as bar:
            for index, shard_rows in shards:
                shard = Shard(index, np.zeros(0, np.int64), None)
                rows: list[int] = []
                parts: list[torch.Tensor] = []
                outputs: list[tuple[np.ndarray, np.ndarray | None]] = []
                in_flight: _HostCopy | None = None
                seen = 0
                while seen < len(shard_rows):
                    chunk = next(batches)
                    seen += len(chunk["rows"]) + len(chunk["errors"])
                    for i, error in chunk["errors"]:
                        if strict:
                            raise UnreadableImageError(error)
                        shard.skipped.append({"index": i, "input": describe(inputs[i]), "error": error})
                    if chunk["pixels"] is not None:
                        rows += chunk["rows"]
                        parts.append(chunk["pixels"])
                    while sum(len(p) for p in parts) >= batch_size or (seen == len(shard_rows) and parts):
                        batch, parts = _take(parts, batch_size)
                        launched = _HostCopy.start(self._launch(batch, local_features))
                        if in_flight is not None:  # on CUDA, the batch before; the GPU runs this one meanwhile
                            outputs.append(in_flight.numpy())
                        in_flight = launched
                    bar.update(len(chunk["rows"]) + len(chunk["errors"]))
                if in_flight is not None:
                    outputs.append(in_flight.numpy())
                    in_flight = None
                shard.rows = np.asarray(rows, dtype=np.int64)
                shard.descriptors = (
                    np.concatenate([d for d, _ in outputs])
                    if outputs
                    else np.zeros((0, self.identity()["descriptor_dim"]), np.float32)
                )
                if local_features and outputs:
                    shard.local_features = np.concatenate([local for _, local in outputs])
                report.embedded += len(rows)
                report.skipped += shard.skipped
                yield shard
        report.seconds = round(time.perf_counter() - start, 3)
        report.images_per_second = round(report.embedded / max(report.seconds, 1e-9), 2)


def _yield_to_the_model(worker_id: int) -> None:
    """A CPU decoding worker runs at the lowest priority: the model's intra-op threads keep every
    core (threads that share cores with decoders wait on each other at every barrier), and the
    workers decode when the model waits for data (+20 % images/s on 2 cores, README)."""
    if hasattr(os, "nice"):
        os.nice(19)


def _take(parts: list[torch.Tensor], count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``count`` rows of ``parts`` (as views) and the rest."""
    taken, rest, need = [], [], count
    for part in parts:
        if need >= len(part):
            taken.append(part)
            need -= len(part)
        elif need:
            taken.append(part[:need])
            rest.append(part[need:])
            need = 0
        else:
            rest.append(part)
    return taken, rest


def _to_numpy(outputs: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[np.ndarray, np.ndarray | None]:
    descriptors, local = outputs
    return descriptors.float().cpu().numpy(), None if local is None else local.float().cpu().numpy()


@dataclass
class _HostCopy:
    """Model outputs on their way to the host. On CUDA the copy into pinned memory is queued right
    after the forward pass and marked by an event: collecting a batch then waits for that batch
    only, not for the forward passes queued after it."""

    outputs: tuple[torch.Tensor, torch.Tensor | None]
    done: torch.cuda.Event | None = None

    @classmethod
    def start(cls, outputs: tuple[torch.Tensor, torch.Tensor | None]) -> _HostCopy:
        if outputs[0].device.type != "cuda":
            return cls(outputs)
        host = tuple(None if t is None else _pinned_float_copy(t) for t in outputs)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(outputs[0].device))  # the copies' stream, whichever GPU is current
        return cls(host, done)

    def numpy(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.done is not None:
            self.done.synchronize()
        return _to_numpy(self.outputs)


def _pinned_float_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=True)
    return host.copy_(tensor.float(), non_blocking=True)


def _set_attention(model: torch.nn.Module, attention: str) -> None:
    """Set the attention implementation of the model, or of its transformers sub-models (the
    Dinov2 backbone) when the vprhub wrapper does not declare support itself."""
    from transformers import PreTrainedModel

    targets = [model] if isinstance(model, PreTrainedModel) else []
    try:
        model.set_attn_implementation(attention)
        return
    except (AttributeError, ValueError, ImportError):
        targets = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]
    try:
        if not targets:
            raise ValueError("it holds no transformers model")
        for target in targets:
            target.set_attn_implementation(attention)
    except (ValueError, ImportError) as err:
        raise ValueError(f"cannot use attention implementation {attention!r} with this model: {err}") from None


def _shard_ranges(num_inputs: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_inputs)) for start in range(0, num_inputs, shard_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_reference(name_or_path: str | None) -> str | None:
    """A local model folder as an absolute path (an index then works from any directory); a Hub id as is."""
    if not name_or_path:
        return None
    folder = Path(name_or_path).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name_or_path


def _hub_revision(model: torch.nn.Module) -> str | None:
    """The Hub commit a model was loaded from (``None`` for a local folder or a model built in memory)."""
    name_or_path = getattr(model, "name_or_path", None)
    if not name_or_path or Path(name_or_path).expanduser().is_dir():
        return None
    return getattr(getattr(model, "config", None), "_commit_hash", None)
