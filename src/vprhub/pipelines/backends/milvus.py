"""The Milvus backend: one collection per index, reached through ``pymilvus``.

A URI ending in ``.db`` (or any local path) is a milvus-lite file (an embedded engine started
by pymilvus); ``http://host:19530`` / ``tcp://...`` is a Milvus server or cluster. The schema is
``id INT64`` (primary key, the index's stable ids), ``vector FLOAT_VECTOR(D)`` (FLAT index,
inner product: exact search, the same hits as faiss flat) and ``metadata JSON``. The index's
manifest (model identity, next id, build report) is a collection property, so reopening the
URI after a restart restores the whole ``PlaceIndex``.

Probed with milvus-lite 3.2 / pymilvus 3.0 here: 8448-d float vectors work (Milvus allows up
to 32768); milvus-lite supports FLOAT_VECTOR only (no float16 / binary vectors, hence no
compressed storage in this backend); an insert request is capped at 64 MB, so rows go in
batches of at most 32 MB; filter templates (``filter_params``) are not supported, so id sets
are written into the expression.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

MANIFEST_PROPERTY = "vprhub.manifest"
DEFAULT_COLLECTION = "places"
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus' rule for collection names
_MAX_REQUEST_BYTES = 32 * 2**20
_MAX_QUERIES = 1024  # queries per search request
_QUERY_BATCH = 16384  # rows per query-iterator page
_GET_BATCH = 4096  # ids per get request


def is_milvus_uri(location: str | os.PathLike) -> bool:
    """A server URI, or a milvus-lite database (``*.db``; milvus-lite 3 makes it a folder) rather
    than a faiss index folder."""
    text = str(location)
    return text.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")) or (
        text.endswith(".db") and not os.path.isfile(os.path.join(text, "vprindex.json"))
    )


def _literal(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False)  # Milvus reads no \\uXXXX escapes


def filter_expression(where: Mapping[str, Any] | None = None, allowed: Iterable[int] | None = None) -> str:
    """A Milvus boolean expression for a metadata filter and / or a set of allowed ids."""
    terms = []
    for key, value in (where or {}).items():
        field = f"metadata[{_literal(key)}]"
        if isinstance(value, (list, tuple, set)):
            terms.append(" or ".join(f"{field} == {_literal(v)}" for v in value) or "false")
        else:
            terms.append(f"{field} == {_literal(value)}")
    if allowed is not None:
        terms.append(f"id in [{', '.join(str(int(i)) for i in allowed)}]")
    return " and ".join(f"({t})" for t in terms)


def _quiet_clients() -> None:
    """No gRPC notes on forks (the decoding workers) unless the user sets ``GRPC_VERBOSITY``, and no
    pymilvus warning that milvus-lite has no server timestamp for its query iterator (it is expected)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read when gRPC loads, i.e. with pymilvus below
    # a filter holds on its own logger only; adding the same one again changes nothing
    logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_no_mvcc_note)


def _no_mvcc_note(record: logging.LogRecord) -> bool:
    return "failed to get mvccTs" not in record.getMessage()


class MilvusStore:
    """Vectors and metadata in one Milvus collection."""

    kind = "milvus"

    def __init__(self, uri: str | os.PathLike, collection: str = DEFAULT_COLLECTION) -> None:
        _quiet_clients()
        from pymilvus import MilvusClient

        self.uri, self.collection = str(uri), collection
        self.index_type, self.factory, self.search_params = "flat", "FLAT", {}
        if not is_milvus_uri(self.uri):
            raise ValueError(f"{self.uri} is not a Milvus URI: use a milvus-lite file (*.db) or http://host:19530")
        if not COLLECTION_NAME.fullmatch(collection):
            raise ValueError(
                f"invalid Milvus collection name {collection!r}: a letter or _ first, then letters, digits and _ "
                "(at most 255)"
            )
        try:
            self.client = MilvusClient(self.uri)
        except Exception as err:  # pymilvus raises MilvusException or gRPC / OS errors
            reason = getattr(err, "message", None) or str(err)
            if not self.uri.startswith(("http://", "https://", "tcp://", "grpc://")):
                reason += " (a milvus-lite database is open in one process at a time: is another using it?)"
            raise ValueError(f"cannot reach Milvus at {self.uri}: {reason}") from None
        self.dim: int | None = None
        if self.exists():
            fields = {f["name"]: f for f in self.client.describe_collection(collection)["fields"]}
            if set(fields) != {"id", "vector", "metadata"}:
                raise ValueError(f"Milvus collection {collection!r} at {self.uri} was not written by vprhub")
            self.dim = int(fields["vector"]["params"]["dim"])
            self.client.load_collection(collection)

    def exists(self) -> bool:
        return self.client.has_collection(self.collection)

    def create(self, dim: int, manifest: Mapping[str, Any]) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("metadata", DataType.JSON)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(
            self.collection, schema=schema, index_params=params,
            properties={MANIFEST_PROPERTY: json.dumps(dict(manifest), allow_nan=False)},
        )
        self.dim = int(dim)

    def manifest(self) -> dict | None:
        text = self.client.describe_collection(self.collection).get("properties", {}).get(MANIFEST_PROPERTY)
        return None if text is None else json.loads(text)

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        self.client.alter_collection_properties(
            self.collection, properties={MANIFEST_PROPERTY: json.dumps(dict(manifest), allow_nan=False)}
        )

    def close(self) -> None:
        """Release the connection (and a milvus-lite file's lock: one process may hold it at a time)."""
        self.client.close()
        if not self.uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    def drop(self) -> None:
        self.client.drop_collection(self.collection)

    # ------------------------------------------------------------------ entries
    @property
    def is_trained(self) -> bool:
        return True

    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _iterate(self, expression: str, fields: list[str]) -> Iterable[dict]:
        iterator = self.client.query_iterator(
            self.collection, batch_size=_QUERY_BATCH, filter=expression, output_fields=fields
        )
        try:
            while page := iterator.next():
                yield from page
        finally:
            iterator.close()

    def ids(self) -> np.ndarray:
        return np.sort(np.fromiter((r["id"] for r in self._iterate("", ["id"])), dtype=np.int64))

    def ids_from(self, first: int) -> np.ndarray:
        """Ids >= ``first`` (entries written after the manifest's ``next_id``, e.g. by a killed build)."""
        return np.fromiter((r["id"] for r in self._iterate(f"id >= {int(first)}", ["id"])), dtype=np.int64)

    def upsert(self, ids: np.ndarray, x: np.ndarray, rows: list[dict]) -> None:
        """Insert or replace entries by id (idempotent: a resumed build may send a row twice)."""
        step = max(1, _MAX_REQUEST_BYTES // (x.shape[1] * 4 + 1024))
        for start in range(0, len(ids), step):
            batch = [
                {"id": int(i), "vector": v, "metadata": row}
                for i, v, row in zip(ids[start : start + step], x[start : start + step], rows[start : start + step])
            ]
            self.client.upsert(self.collection, batch)

    def remove(self, ids: np.ndarray) -> None:
        self.client.delete(self.collection, ids=[int(i) for i in ids])

    def metadata(self, ids: list[int]) -> list[dict]:
        found = {}
        for start in range(0, len(ids), _GET_BATCH):
            rows = self.client.get(self.collection, ids=list(ids[start : start + _GET_BATCH]), output_fields=["metadata"])
            found.update((r["id"], r["metadata"]) for r in rows)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no entry with id {missing[0]}")
        return [dict(found[i]) for i in ids]

    def select(self, where: Mapping[str, Any]) -> np.ndarray:
        return np.fromiter((r["id"] for r in self._iterate(filter_expression(where), ["id"])), dtype=np.int64)

    def missing_keys(self, keys: set[str]) -> set[str]:
        """The ``keys`` that no entry's metadata has."""
        missing = set(keys)
        for row in self._iterate("", ["metadata"]):
            missing -= row["metadata"].keys()
            if not missing:
                break
        return missing

    def coordinates(self, keys: tuple[str, str], where: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        found = [
            (r["id"], (r["metadata"][keys[0]], r["metadata"][keys[1]]))
            for r in self._iterate(filter_expression(where), ["id", "metadata"])
            if all(isinstance(r["metadata"].get(k), (int, float)) and not isinstance(r["metadata"].get(k), bool)
                   for k in keys)
        ]
        ids = np.asarray([i for i, _ in found], dtype=np.int64)
        return ids, np.asarray([c for _, c in found], dtype=np.float64).reshape(-1, 2)

    def search(
        self, x: np.ndarray, k: int, where: Mapping[str, Any] | None = None, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(x), k), -np.inf, dtype=np.float32)
        ids = np.full((len(x), k), -1, dtype=np.int64)
        if allowed is not None and not len(allowed):
            return scores, ids
        expression = filter_expression(where, allowed)
        for start in range(0, len(x), _MAX_QUERIES):
            results = self.client.search(
                self.collection, data=list(x[start : start + _MAX_QUERIES]), limit=int(k), filter=expression,
                output_fields=["id"], search_params={"metric_type": "IP"},
            )
            for row, hits in enumerate(results, start):
                ids[row, : len(hits)] = [h["id"] for h in hits]
                scores[row, : len(hits)] = [h["distance"] for h in hits]
        return scores, ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        found = {r["id"]: r["vector"] for r in self.client.get(self.collection, ids=[int(i) for i in ids],
                                                              output_fields=["vector"])}
        return np.asarray([found[int(i)] for i in ids], dtype=np.float32).reshape(-1, self.dim)
