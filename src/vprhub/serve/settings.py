"""The service's settings: batching, limits, and who may call it."""

from __future__ import annotations

import dataclasses
import ipaddress
import math

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What ``vprhub serve`` is told; :meth:`check` refuses inconsistent values.

    Args:
        host: address to bind; anything but loopback needs ``api_key``.
        port: TCP port.
        top_k: hits per photo unless a request asks for fewer or more.
        rerank: re-rank by SelaVPR local features (needs a SelaVPR model and an index with local features).
        rerank_candidates: global hits re-ranked per photo.
        max_batch: photos per model forward pass.
        max_wait_ms: how long the first photo of a batch waits for others (less than ``timeout_s``).
        max_queue: photos waiting for the model; beyond it requests are answered 503 with Retry-After.
        max_upload_mb: largest request body (all photos of one request together).
        max_pixels: largest decoded photo (width x height); larger ones are refused before decoding.
        timeout_s: a request that has no answer after this long is answered 504.
        api_key: required in the ``X-API-Key`` header of every call but ``/``, ``/health`` and static files.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    top_k: int = 5
    rerank: bool = False
    rerank_candidates: int = 100
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000
    timeout_s: float = 30.0
    api_key: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_in_flight(self) -> int:
        """Requests handled at once: a full queue plus a batch inside the model."""
        return self.max_queue + self.max_batch

    def check(self) -> ServeSettings:
        """Raise ``ValueError`` naming the first bad setting (NaN and infinite numbers too); returns ``self``."""
        for name in ("max_wait_ms", "max_upload_mb", "timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("top_k", "rerank_candidates", "max_batch", "max_queue", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_wait_ms >= self.timeout_s * 1000:
            raise ValueError(
                f"max_wait_ms={self.max_wait_ms:g} must be below timeout_s={self.timeout_s:g} s "
                "(a photo that waits that long for batch mates gets no answer)"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.rerank and self.top_k > self.rerank_candidates:
            raise ValueError(f"top_k={self.top_k} is larger than rerank_candidates={self.rerank_candidates}")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"binding to {self.host} exposes the service beyond this machine: "
                "give an API key (--api-key or the VPRHUB_API_KEY environment variable)"
            )
        return self
