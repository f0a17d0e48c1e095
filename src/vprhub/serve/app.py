"""The FastAPI application: ``POST /search``, ``GET /health``, ``GET /info``, ``GET /images/{id}`` and the page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from .batching import DynamicBatcher, QueueFull
from .searcher import PlaceSearcher, image_file
from .searcher import Query as PhotoQuery
from .settings import ServeSettings
from .uploads import decode_image

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health")  # and /static/*: no API key needed
RETRY_AFTER_S = 1
MAX_MESSAGE_CHARS = 200


def _busy(reason: str) -> JSONResponse:
    return JSONResponse({"detail": f"busy: {reason}; retry later"}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 saying where and what, never the input itself (a photo sent as a text field would come back whole)."""
    detail = [
        {"loc": list(problem["loc"]), "msg": problem["msg"][:MAX_MESSAGE_CHARS], "type": problem["type"]}
        for problem in error.errors()
    ]
    return JSONResponse({"detail": detail}, 422)


def _too_slow(timeout_s: float) -> JSONResponse:
    detail = f"the request body did not arrive within {timeout_s:g} s"
    return JSONResponse({"detail": detail}, 408, headers={"Connection": "close"})


async def _read_body(receive: Receive, timeout_s: float) -> bytes | None:
    """The whole request body; ``None`` when the client left or did not send it all within ``timeout_s``."""
    chunks = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` as one message, then waits on the client (for its disconnect)."""
    given = False

    async def replay() -> dict:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class Guard:
    """ASGI middleware in front of every route: the API key, and for ``/search`` the request
    size and the number of requests in flight, checked before the body is read.

    A ``/search`` body is read here, whole, within ``timeout_s`` (408 otherwise, so a slow client
    holds nothing for long), and only then does the request count as in flight: clients that
    trickle their uploads never take the places of real searches. A refused body within the size
    limit is read and dropped too, so that the client gets the answer rather than a reset connection.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, counters: dict) -> None:
        self.app, self.settings, self.counters = app, settings, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = None
        if self.settings.api_key and not (path in OPEN_PATHS or path.startswith("/static/")):
            if not hmac.compare_digest(headers.get("x-api-key", "").encode(), self.settings.api_key.encode()):
                refusal = JSONResponse({"detail": "missing or wrong API key (X-API-Key header)"}, 401)
        if refusal is None and path == "/search":
            refusal = self._admit(headers)
        if refusal is None and path != "/search":
            return await self.app(scope, receive, send)
        fits = self._length(headers) <= self.settings.max_upload_bytes
        if refusal is None or (refusal.status_code in (401, 503) and fits):
            body = await _read_body(receive, self.settings.timeout_s)
            if body is None:
                refusal = _too_slow(self.settings.timeout_s)
        if refusal is None:
            refusal = self._over_capacity()  # other requests may have come in while this body arrived
        if refusal is not None:
            return await refusal(scope, receive, send)
        self.counters["in_flight"] += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.counters["in_flight"] -= 1

    @staticmethod
    def _length(headers: dict[str, str]) -> float:
        """The declared body size; infinite when none is declared."""
        length = headers.get("content-length", "")
        return int(length) if length.isdigit() else float("inf")

    def _admit(self, headers: dict[str, str]) -> JSONResponse | None:
        length = self._length(headers)
        if length == float("inf"):
            return JSONResponse({"detail": "a search request needs a Content-Length header"}, 411)
        if length > self.settings.max_upload_bytes:
            limit = f"{self.settings.max_upload_mb:g} MB"
            return JSONResponse({"detail": f"the request has {length} bytes, more than the limit of {limit}"}, 413)
        return self._over_capacity()

    def _over_capacity(self) -> JSONResponse | None:
        if self.counters["in_flight"] >= self.settings.max_in_flight:
            return _busy(f"{self.counters['in_flight']} requests in progress")
        return None


def create_app(searcher: PlaceSearcher, settings: ServeSettings) -> FastAPI:
    """The service over ``searcher`` with the limits of ``settings`` (checked here)."""
    settings.check()
    if settings.rerank != searcher.rerank:
        raise ValueError(f"settings.rerank={settings.rerank} but the searcher has rerank={searcher.rerank}")
    batcher = DynamicBatcher(searcher.search, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
    counters = {"in_flight": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="vprhub", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, settings=settings, counters=counters)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.batcher = batcher

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "queued": batcher.queued, "in_flight": counters["in_flight"]}

    @app.get("/info")
    def info() -> dict:
        return {
            **searcher.info(),
            "version": __version__,
            "top_k": settings.top_k,
            "batching": {
                "max_batch": settings.max_batch,
                "max_wait_ms": settings.max_wait_ms,
                "max_queue": settings.max_queue,
                "batches_formed": {str(k): v for k, v in sorted(batcher.batch_sizes.items())},
            },
            "limits": {
                "max_upload_mb": settings.max_upload_mb,
                "max_pixels": settings.max_pixels,
                "timeout_s": settings.timeout_s,
            },
        }

    @app.post("/search")
    async def search(
        images: Annotated[list[UploadFile], File(description="one or several photos")],
        top_k: Annotated[int | None, Query(description="hits per photo")] = None,
    ):
        top_k = settings.top_k if top_k is None else top_k
        try:
            searcher.check_top_k(top_k)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        if len(images) > settings.max_queue:
            raise HTTPException(400, f"{len(images)} photos in one request; at most {settings.max_queue}")
        queries = []
        for number, upload in enumerate(images, 1):
            data = await upload.read()
            try:
                image = await run_in_threadpool(
                    decode_image, data, settings.max_pixels, searcher.image_size, f"photo {number} ({upload.filename})"
                )
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            queries.append(PhotoQuery(image, top_k))
        try:
            futures = batcher.submit(queries)
        except QueueFull as err:
            return _busy(str(err))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), settings.timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"no answer within {settings.timeout_s:g} s") from None
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        # Plain JSON values already: a JSONResponse skips FastAPI's per-value walk (a third of a request's CPU).
        return JSONResponse({"results": [{"filename": u.filename, "hits": hits} for u, hits in zip(images, results)]})

    @app.get("/images/{entry_id}")
    def entry_image(entry_id: int) -> FileResponse:
        """The image file of an index entry (only files the index records)."""
        try:
            (metadata,) = searcher.index.metadata([entry_id])
        except KeyError:
            raise HTTPException(404, f"no entry with id {entry_id}") from None
        path = image_file(metadata)
        if path is None:
            raise HTTPException(404, f"entry {entry_id} has no reachable image file")
        return FileResponse(path)

    return app
