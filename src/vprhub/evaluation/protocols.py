"""Named evaluation protocols: which images, which positives, which size, batch and precision.

Published recalls differ silently with the protocol (MSLS-val with 740 queries or all of them,
Nordland with a 1-frame or a 10-frame threshold, the image size, CricaVPR's batch size). A
:class:`Protocol` pins the data and the positive rule; :data:`MODEL_SETTINGS` pins, per model
type, the image size, batch size and precision of the official evaluations. Both are data:
the README prints the same table with the source of every choice.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .benchmarks import MSLS_FOLDERS, NPY_BENCHMARKS
from .geo_folder import read_geo_folder
from .msls import MSLS_VAL_CITIES, read_msls
from .npy_lists import read_npy_lists
from .testset import VPRTestSet

LAYOUTS = ("geo", "npy", "msls")


@dataclass(frozen=True)
class Protocol:
    """One benchmark split evaluated one way.

    Args:
        name: the ``--protocol`` name.
        layout: ``"geo"`` (@UTM file names), ``"npy"`` (SALAD/MixVPR image lists) or ``"msls"``
            (MSLS's own csv layout).
        folders: where the data sits under the data root (geo: the folder holding the database
            and query folders, first existing one wins; npy: the key of ``NPY_BENCHMARKS``).
        positives: the positive rule, in words.
        radius: metres for the layouts that derive positives from coordinates; ``None`` when the
            lists carry their own ground truth.
        num_queries: query count of the genuine set, checked when known.
        num_database: database count of the genuine set, checked when known.
        queries_dir: the query folder of a geo layout.
        cricavpr_batch_size: CricaVPR's batch (its descriptors depend on it).
        source: where the choices come from.
    """

    name: str
    layout: str
    folders: tuple[str, ...]
    positives: str
    radius: float | None
    num_queries: int | None
    num_database: int | None
    source: str
    queries_dir: str = "queries"
    cricavpr_batch_size: int = 16

    @property
    def data(self) -> str:
        """Where the data sits under the root, in words."""
        if self.layout == "npy":
            folder, prefix = NPY_BENCHMARKS[self.folders[0]]
            return f"{folder}/{prefix}_*.npy"
        if self.layout == "msls":
            return " | ".join(f"{folder}/train_val" for folder in self.folders)
        return " | ".join(f"{folder}/{{database,{self.queries_dir}}}" for folder in self.folders)

    def load(self, root: str | os.PathLike) -> VPRTestSet:
        """The protocol's test set under the data ``root``; ``ValueError`` if it is not the genuine set."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist")
        test_set = self._read(root)
        expected = {"queries": self.num_queries, "database images": self.num_database}
        found = {"queries": test_set.num_queries, "database images": test_set.num_database}
        wrong = [f"{found[k]} {k} (expected {v})" for k, v in expected.items() if v is not None and found[k] != v]
        if wrong:
            raise ValueError(
                f"protocol {self.name}: the data under {root} has {' and '.join(wrong)}; it is not the "
                f"{self.name} set ({self.source})"
            )
        return test_set

    def _read(self, root: Path) -> VPRTestSet:
        if self.layout == "npy":
            folder, prefix = NPY_BENCHMARKS[self.folders[0]]
            return read_npy_lists(root / folder, prefix, name=self.name)
        candidates = [root / folder for folder in (MSLS_FOLDERS if self.layout == "msls" else self.folders)]
        for folder in candidates:
            if self.layout == "msls" and (folder / "train_val").is_dir():
                return read_msls(folder, MSLS_VAL_CITIES, self.name, self.radius)
            if self.layout == "geo" and (folder / "database").is_dir():
                return read_geo_folder(folder, self.name, self.radius, queries_dir=self.queries_dir)
        tried = "\n  ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"protocol {self.name}: no {self.layout} data under {root}; looked for:\n  {tried}")


@dataclass(frozen=True)
class ModelSettings:
    """Image size, batch size and precision of a model type's official evaluation."""

    image_size: tuple[int, int] | None  # None: the model's own image processor
    batch_size: int
    precision: str
    source: str


_RADIUS_25 = "database images within 25 m of the query (UTM), inclusive"
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "pitts30k-test", "geo", ("pitts30k/images/test",), _RADIUS_25, 25.0, 6816, 10000,
            "Pittsburgh 30k test split (Arandjelovic et al., NetVLAD); gmberton/VPR-datasets-downloader layout",
            cricavpr_batch_size=8,
        ),
        Protocol(
            "pitts250k-test", "geo", ("pitts250k/images/test",), _RADIUS_25, 25.0, 8280, 83952,
            "Pittsburgh 250k test split (Torii et al.); gmberton/VPR-datasets-downloader layout",
            cricavpr_batch_size=8,
        ),
        Protocol(
            "msls-val-740", "npy", ("msls_val",), "msls_val_pIdx.npy (the lists' own, 25 m)", None, 740, None,
            "the 740 evaluated rows (msls_val_qIdx.npy) of the MSLS-val lists shipped with GSV-Cities, "
            "MixVPR and SALAD (datasets/msls_val/); images under mapillary/",
        ),
        Protocol(
            "msls-val-full", "msls", MSLS_FOLDERS, _RADIUS_25 + ", same city; queries without one are "
            "excluded and counted", 25.0, None, None,
            "every MSLS val query (cph, sf; panoramas dropped) as the official mapillary_sls val reader",
        ),
        Protocol(
            "tokyo247", "geo", ("tokyo247/images/test",), _RADIUS_25, 25.0, 315, 75984,
            "Tokyo 24/7 (Torii et al.), 315 queries; gmberton/VPR-datasets-downloader layout",
        ),
        Protocol(
            "nordland-1frame", "npy", ("nordland",), "Nordland_gt.npy: the same frame only", None, None, None,
            "the Nordland lists of GSV-Cities, MixVPR, BoQ and SALAD (datasets/Nordland/)",
        ),
        Protocol(
            "nordland-10frame", "geo", ("nordland/images/test",), "within 10 frames (25 m on the dummy UTM line "
            "where frames are 25/10.5 m apart)", 25.0, None, None,
            "Patch-NetVLAD split as gmberton/VPR-datasets-downloader download_nordland.py writes it "
            "(CosPlace, EigenPlaces, MegaLoc)",
        ),
        Protocol(
            "sped", "npy", ("sped",), "SPED_gt.npy (the lists' own)", None, None, None,
            "the SPED lists of MixVPR and SALAD (datasets/SPEDTEST/)",
        ),
        Protocol(
            "sf-xl-v1-test", "geo", ("sf_xl/processed/test", "sf_xl/images/test"), _RADIUS_25, 25.0, 1000, None,
            "San Francisco eXtra Large test set, queries v1 (Berton et al., CosPlace)", queries_dir="queries_v1",
        ),
    )
}

MODEL_SETTINGS: dict[str, ModelSettings] = {
    "salad": ModelSettings((322, 322), 32, "float16", "serizba/salad eval.py: 322x322, fp16 autocast; "
                           "batch-independent, so the batch size has no effect"),
    "selavpr": ModelSettings((224, 224), 16, "float32", "Lu-Feng/SelaVPR parser.py --resize 224 224, "
                             "--infer_batch_size 16, no autocast in test.py"),
    "cricavpr": ModelSettings((224, 224), 16, "float32", "Lu-Feng/CricaVPR --resize 224 224, "
                              "--infer_batch_size 16 (8 for pitts*, eval.py), no autocast in test.py"),
}
DEFAULT_SETTINGS = ModelSettings(None, 32, "float32", "no published protocol for this model type: its own "
                                 "image processor size, float32")


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; ``ValueError`` listing the valid names."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)} (see --list-protocols)")
    return PROTOCOLS[name]


def settings_for(protocol: Protocol, model_type: str) -> ModelSettings:
    """The settings a ``model_type`` is evaluated with under ``protocol``."""
    settings = MODEL_SETTINGS.get(model_type, DEFAULT_SETTINGS)
    if model_type == "cricavpr":
        settings = ModelSettings(settings.image_size, protocol.cricavpr_batch_size, settings.precision, settings.source)
    return settings


def describe(protocol: Protocol, settings: ModelSettings, image_size: tuple[int, int]) -> dict:
    """What the JSON report records next to the recalls."""
    record = {k: v for k, v in asdict(protocol).items() if k not in ("cricavpr_batch_size", "folders")}
    record.update(
        data=protocol.data,
        image_size=list(image_size),
        batch_size=settings.batch_size,
        precision=settings.precision,
        settings_source=settings.source,
    )
    return record


def protocols_table() -> str:
    """The text ``vprhub eval --list-protocols`` prints."""
    header = ("protocol", "layout", "under --root", "queries", "database", "positives")
    rows = [
        (p.name, p.layout, p.data, str(p.num_queries or "-"), str(p.num_database or "-"), p.positives)
        for p in PROTOCOLS.values()
    ]
    models = [("model type", "image size", "batch", "precision", "source")]
    models += [
        (name, f"{s.image_size[0]}x{s.image_size[1]}", str(s.batch_size), s.precision, s.source)
        for name, s in MODEL_SETTINGS.items()
    ]
    models.append(("other", "processor's", str(DEFAULT_SETTINGS.batch_size), DEFAULT_SETTINGS.precision, ""))
    sources = [f"  {p.name}: {p.source}" for p in PROTOCOLS.values()]
    return "\n".join(
        [_columns([header, *rows]), "", "Per model type (CricaVPR uses batch 8 on pitts*):", _columns(models), "",
         "Sources:", *sources]
    )


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
