"""The localisation service over a real uvicorn server on 127.0.0.1: hits equal the index's own
search, dynamic batching, overload (503 + Retry-After, then recovery), limits, bad uploads, API key."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import EpsImagePlugin, IcoImagePlugin, Image

from serve_server import running, tiny_map
from vprhub import __version__
from vprhub.cli import main
from vprhub.evaluation.geo_folder import parse_utm
from vprhub.image_io import open_image
from vprhub.serve import PlaceSearcher, ServeSettings, create_app
from vprhub.serve.searcher import Query as PhotoQuery
from vprhub.serve.settings import is_loopback
from vprhub.serve.uploads import decode_image


@pytest.fixture(scope="module")
def salad_map(tmp_path_factory):
    return tiny_map(tmp_path_factory.mktemp("salad_map"))


def serve(salad_map, searcher_class=PlaceSearcher, **settings):
    pipe, index, _ = salad_map
    searcher = searcher_class(pipe, index)
    return running(create_app(searcher, ServeSettings(**settings))), searcher


def expected_hits(salad_map, paths, k):
    """Top-k ids and scores of the photos straight from PlaceIndex.search."""
    pipe, index, _ = salad_map
    return index.search(np.stack(pipe([str(p) for p in paths])), k)


def upload(*paths):
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def assert_same_hits(hits, ids, scores):
    assert [hit["id"] for hit in hits] == ids.tolist()
    np.testing.assert_allclose([hit["score"] for hit in hits], scores, atol=1e-5)


class GatedSearcher(PlaceSearcher):
    """The real searcher, held before the model until the test opens ``gate``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def embed_batch(self, images):
        self.gate.wait(timeout=60)
        return super().embed_batch(images)


def wait_for(url, **state):
    """Poll /health until it reports ``state`` (e.g. queued=2)."""
    for _ in range(2000):
        health = httpx.get(f"{url}/health").json()
        if all(health[key] == value for key, value in state.items()):
            return
        time.sleep(0.005)
    raise AssertionError(f"/health never reported {state}: {health}")


def test_search_returns_the_index_hits_with_positions_and_images(salad_map):
    pipe, index, queries = salad_map
    server, _ = serve(salad_map, top_k=3)
    with server as url:
        response = httpx.post(f"{url}/search", files=upload(*queries[:4]))
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        scores, ids = expected_hits(salad_map, queries[:4], 3)
        assert [r["filename"] for r in results] == [q.name for q in queries[:4]]
        for result, row_ids, row_scores in zip(results, ids, scores):
            assert_same_hits(result["hits"], row_ids, row_scores)
            for hit in result["hits"]:
                (metadata,) = index.metadata([hit["id"]])
                assert hit["metadata"] == metadata
                east, north = parse_utm(metadata["path"])
                assert hit["position"] == {"x": east, "y": north, "frame": "utm"}
                assert hit["image_url"] == f"/images/{hit['id']}"
        first = results[0]["hits"][0]
        image = httpx.get(f"{url}{first['image_url']}")
        assert image.status_code == 200 and image.content == open(first["metadata"]["path"], "rb").read()
        assert httpx.get(f"{url}/images/{len(index) + 5}").status_code == 404
        assert httpx.get(f"{url}/images/..%2F..%2Fetc%2Fpasswd").status_code == 404  # ids only, never paths
        assert httpx.get(f"{url}/images/entry.jpg").status_code == 422

        one = httpx.post(f"{url}/search", params={"top_k": 5}, files=upload(queries[5])).json()["results"]
        scores, ids = expected_hits(salad_map, queries[5:6], 5)
        assert_same_hits(one[0]["hits"], ids[0], scores[0])

        info = httpx.get(f"{url}/info").json()
        assert info["map_size"] == len(index) == 12 and info["descriptor_dim"] == pipe.descriptor_dim
        assert info["model"]["model_type"] == "salad" and info["version"] == __version__
        assert info["model"]["config_hash"] == index.identity["config_hash"]
        assert info["backend"] == {"name": "faiss", "structure": "Flat"} and info["top_k"] == 3
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "queued": 0, "in_flight": 0}
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
        assert "function search" in httpx.get(f"{url}/static/app.js").text


def test_concurrent_requests_share_forward_passes_and_keep_their_answers(salad_map):
    _, _, queries = salad_map
    # A long wait lets every batch fill to max_batch: 8 concurrent photos make 2 batches of 4.
    server, _ = serve(salad_map, top_k=2, max_batch=4, max_wait_ms=3000)
    scores, ids = expected_hits(salad_map, queries + queries[:2], 2)
    with server as url, ThreadPoolExecutor(8) as pool:
        photos = queries + queries[:2]
        responses = list(pool.map(lambda p: httpx.post(f"{url}/search", files=upload(p), timeout=60), photos))
        for response, row_ids, row_scores in zip(responses, ids, scores):
            assert response.status_code == 200, response.text
            assert_same_hits(response.json()["results"][0]["hits"], row_ids, row_scores)
        assert httpx.get(f"{url}/info").json()["batching"]["batches_formed"] == {"4": 2}


def test_one_batch_with_different_top_k_answers_each_photo_with_its_own_hits(salad_map):
    """The searcher searches the index once per distinct top_k; every photo keeps its own answer."""
    pipe, index, queries = salad_map
    searcher = PlaceSearcher(pipe, index)
    wanted = [3, 1, 3, 2, 1]
    photos = [decode_image(path.read_bytes(), 10**8) for path in queries[: len(wanted)]]
    results = searcher.search([PhotoQuery(photo, k) for photo, k in zip(photos, wanted)])
    for path, k, hits in zip(queries, wanted, results):
        scores, ids = expected_hits(salad_map, [path], k)
        assert_same_hits(hits, ids[0], scores[0])


def test_overload_is_refused_with_503_and_the_service_recovers(salad_map):
    _, _, queries = salad_map
    # max_batch 1 + max_queue 2: one photo in the model, two waiting, three requests in flight at most.
    server, searcher = serve(salad_map, GatedSearcher, top_k=2, max_batch=1, max_wait_ms=0, max_queue=2)
    scores, ids = expected_hits(salad_map, queries, 2)
    with server as url, ThreadPoolExecutor(3) as pool:
        first = pool.submit(httpx.post, f"{url}/search", files=upload(queries[0]), timeout=60)
        wait_for(url, queued=0, in_flight=1)  # inside the model, held at the gate
        second = pool.submit(httpx.post, f"{url}/search", files=upload(queries[1]), timeout=60)
        wait_for(url, queued=1, in_flight=2)
        full_queue = httpx.post(f"{url}/search", files=upload(queries[2], queries[3]))  # 2 photos, 1 place left
        assert full_queue.status_code == 503 and full_queue.headers["retry-after"] == "1"
        assert full_queue.json()["detail"] == "busy: the queue holds 1 of 2 photos; retry later"
        third = pool.submit(httpx.post, f"{url}/search", files=upload(queries[2]), timeout=60)
        wait_for(url, queued=2, in_flight=3)
        too_many = httpx.post(f"{url}/search", files=upload(queries[3]))
        assert too_many.status_code == 503 and too_many.headers["retry-after"] == "1"
        assert too_many.json()["detail"] == "busy: 3 requests in progress; retry later"
        searcher.gate.set()
        for number, future in enumerate((first, second, third)):
            assert future.result().status_code == 200
            assert_same_hits(future.result().json()["results"][0]["hits"], ids[number], scores[number])
        again = httpx.post(f"{url}/search", files=upload(queries[4]))
        assert again.status_code == 200
        assert_same_hits(again.json()["results"][0]["hits"], ids[4], scores[4])


class Arrivals:
    """ASGI wrapper that counts the HTTP requests whose headers reached the app."""

    def __init__(self, app):
        self.app, self.count = app, 0

    async def __call__(self, scope, receive, send):
        self.count += scope["type"] == "http"
        await self.app(scope, receive, send)


def trickle(url, photo):
    """A raw connection that sends a search's headers (its full Content-Length) and only the first
    100 bytes of its body, then waits."""
    request = httpx.Request("POST", f"{url}/search", files=upload(photo))
    body = request.read()
    head = f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
    sock = socket.create_connection((request.url.host, request.url.port))
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
    return sock


def reply(sock):
    """Everything the server sends until it closes the connection."""
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_uploads_take_no_place_in_flight_and_are_answered_408(salad_map):
    pipe, index, queries = salad_map
    # max_batch 1 + max_queue 2: three requests in flight at most; four slow uploads would take them all.
    settings = ServeSettings(top_k=2, max_batch=1, max_queue=2, timeout_s=2)
    arrivals = Arrivals(create_app(PlaceSearcher(pipe, index), settings))
    scores, ids = expected_hits(salad_map, queries[:1], 2)
    with running(arrivals) as url:
        slow = [trickle(url, queries[0]) for _ in range(4)]
        for _ in range(2000):
            if arrivals.count == len(slow):
                break
            time.sleep(0.005)
        assert arrivals.count == len(slow)  # every slow upload is being read
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0
        response = httpx.post(f"{url}/search", files=upload(queries[0]))
        assert response.status_code == 200, response.text
        assert_same_hits(response.json()["results"][0]["hits"], ids[0], scores[0])
        for sock in slow:
            with sock:
                answer = reply(sock)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
            assert answer.endswith(b'{"detail":"the request body did not arrive within 2 s"}')
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0


def test_timeout_answers_504_and_frees_the_service(salad_map):
    _, _, queries = salad_map
    server, searcher = serve(salad_map, searcher_class=GatedSearcher, timeout_s=0.2)
    with server as url:
        late = httpx.post(f"{url}/search", files=upload(queries[0]))
        assert late.status_code == 504 and late.json()["detail"] == "no answer within 0.2 s"
        searcher.gate.set()
        assert httpx.post(f"{url}/search", files=upload(queries[0])).status_code == 200


def test_bad_requests_are_refused_with_the_reason(salad_map, tmp_path):
    _, _, queries = salad_map
    server, _ = serve(salad_map, max_pixels=100_000, max_upload_mb=0.05)
    jpeg = queries[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (400, 300), "gray").save(big, format="PNG")
    with server as url:

        def post(files, **params):
            response = httpx.post(f"{url}/search", files=files, params=params)
            return response.status_code, response.json()["detail"]

        text = [("images", ("notes.txt", b"hello, not a photo", "text/plain"))]
        accepted = "BMP, GIF, JPEG, PNG, TIFF, WEBP"
        assert post(text) == (400, f"cannot read image photo 1 (notes.txt): not an image in an accepted format ({accepted})")
        status, detail = post(upload(queries[1]) + [("images", ("cut.jpg", jpeg[:300], "image/jpeg"))])
        assert status == 400 and detail == "cannot read image photo 2 (cut.jpg): Truncated File Read"
        status, detail = post([("images", ("big.png", big.getvalue(), "image/png"))])
        assert status == 400
        assert detail == (
            "cannot read image photo 1 (big.png): decompression bomb refused (400x300 = 120000 pixels, limit 100000)"
        )
        status, detail = post([("images", ("huge.jpg", bytes(60_000), "image/jpeg"))])
        assert status == 413 and detail.endswith("more than the limit of 0.05 MB")
        assert post(upload(queries[0]), top_k=0) == (400, "top_k must be a positive integer, got 0")
        every = httpx.post(f"{url}/search", params={"top_k": 13}, files=upload(queries[0])).json()["results"][0]
        assert len(every["hits"]) == 12  # more than the map holds: the whole map, ranked
        assert httpx.post(f"{url}/search", files=upload(queries[0])).status_code == 200


def test_uploads_in_formats_other_than_common_raster_ones_are_refused_before_decoding(salad_map, monkeypatch):
    """EPS would go to Ghostscript (PostScript from clients run on the server): no upload reaches
    a decoder outside the allow-list, and the reply names the format."""
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda image: opened.append(image))
    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", lambda image: opened.append(image))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    icon = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(icon, format="ICO")
    pdf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(pdf, format="PDF")
    accepted = "BMP, GIF, JPEG, PNG, TIFF, WEBP"
    server, _ = serve(salad_map)
    with server as url:
        for filename, data, reason in [
            ("page.eps", eps, f"EPS images are not accepted (accepted formats: {accepted})"),
            ("icon.ico", icon.getvalue(), f"ICO images are not accepted (accepted formats: {accepted})"),
            ("doc.pdf", pdf.getvalue(), f"not an image in an accepted format ({accepted})"),
        ]:
            response = httpx.post(f"{url}/search", files=[("images", (filename, data, "image/jpeg"))])
            assert response.status_code == 400
            assert response.json()["detail"] == f"cannot read image photo 1 ({filename}): {reason}"
    assert opened == []


def test_a_request_that_does_not_fit_the_api_is_answered_422_without_its_input(salad_map):
    _, _, queries = salad_map
    server, _ = serve(salad_map)
    with server as url:
        text_field = httpx.post(f"{url}/search", files=[("images", (None, b"x" * 800_000))])  # not a file
        assert text_field.status_code == 422
        assert text_field.json() == {
            "detail": [
                {
                    "loc": ["body", "images", 0],
                    "msg": "Value error, Expected UploadFile, received: <class 'str'>",
                    "type": "value_error",
                }
            ]
        }
        bad_top_k = httpx.post(f"{url}/search", params={"top_k": "y" * 1000}, files=upload(queries[0]))
        assert bad_top_k.status_code == 422
        assert bad_top_k.json() == {
            "detail": [
                {
                    "loc": ["query", "top_k"],
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                    "type": "int_parsing",
                }
            ]
        }


def test_decode_applies_exif_orientation_and_refuses_empty_data():
    image = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", exif=exif)
    upright = decode_image(encoded.getvalue(), max_pixels=10_000)
    assert upright.size == (20, 30) and upright.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    with pytest.raises(ValueError, match="cannot read image upload: the upload is empty"):
        decode_image(b"", max_pixels=10)


def test_api_key_is_required_off_loopback_and_checked_when_set(salad_map, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="binding to 0.0.0.0 exposes the service .* give an API key"):
        ServeSettings(host="0.0.0.0").check()
    assert ServeSettings(host="0.0.0.0", api_key="k").check().host == "0.0.0.0"
    # The command refuses before it loads anything (the index does not even exist).
    assert main(["serve", "--index", "missing.vprindex", "--host", "192.168.1.4", "--api-key", ""]) == 2
    assert "give an API key" in capsys.readouterr().err

    _, _, queries = salad_map
    server, _ = serve(salad_map, api_key="s3cret")
    with server as url:
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/").status_code == 200
        for response in (httpx.get(f"{url}/info"), httpx.post(f"{url}/search", files=upload(queries[0]))):
            assert response.status_code == 401
            assert response.json()["detail"] == "missing or wrong API key (X-API-Key header)"
        assert httpx.get(f"{url}/info", headers={"X-API-Key": "wrong"}).status_code == 401
        keyed = httpx.post(f"{url}/search", files=upload(queries[0]), headers={"X-API-Key": "s3cret"})
        assert keyed.status_code == 200


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--max-upload-mb", "nan", "max_upload_mb must be a finite number, got nan"),
        ("--max-upload-mb", "inf", "max_upload_mb must be a finite number, got inf"),
        ("--max-wait-ms", "nan", "max_wait_ms must be a finite number, got nan"),
        ("--max-wait-ms", "inf", "max_wait_ms must be a finite number, got inf"),
        ("--timeout-s", "nan", "timeout_s must be a finite number, got nan"),
        ("--timeout-s", "-inf", "timeout_s must be a finite number, got -inf"),
        (
            "--max-wait-ms",
            "30000",
            "max_wait_ms=30000 must be below timeout_s=30 s (a photo that waits that long for batch mates gets no answer)",
        ),
    ],
)
def test_settings_that_no_request_could_meet_are_refused_at_startup(option, value, error, capsys):
    # The index does not even exist: the settings are checked first.
    assert main(["serve", "--index", "missing.vprindex", f"{option}={value}"]) == 2
    assert capsys.readouterr().err == f"vprhub serve: error: {error}\n"


def test_cricavpr_batch_mode_is_refused_and_independent_mode_served(tmp_path):
    pipe, index, queries = tiny_map(tmp_path, "cricavpr", batch_mode="independent")
    searcher = PlaceSearcher(pipe, index)
    with running(create_app(searcher, ServeSettings(top_k=3))) as url:
        hits = httpx.post(f"{url}/search", files=upload(queries[0])).json()["results"][0]["hits"]
    scores, ids = index.search(pipe(str(queries[0])), 3)
    assert_same_hits(hits, ids[0], scores[0])
    pipe.model.config.batch_mode = "batch"
    with pytest.raises(ValueError, match="batch_mode='batch' cannot be served: each descriptor depends on"):
        PlaceSearcher(pipe, index)


def test_selavpr_rerank_is_served(tmp_path):
    pipe, index, queries = tiny_map(tmp_path, "selavpr")
    with pytest.raises(ValueError, match="rerank=True but the searcher has rerank=False"):
        create_app(PlaceSearcher(pipe, index), ServeSettings(rerank=True))
    searcher = PlaceSearcher(pipe, index, rerank=True, rerank_candidates=6)
    with running(create_app(searcher, ServeSettings(top_k=3, rerank=True, rerank_candidates=6))) as url:
        results = httpx.post(f"{url}/search", files=upload(*queries[:2])).json()["results"]
        beyond = httpx.post(f"{url}/search", params={"top_k": 7}, files=upload(queries[0])).json()["results"][0]
    every = pipe(str(queries[0]), index=index, top_k=6, rerank=True, rerank_candidates=6)
    assert [h["id"] for h in beyond["hits"]] == [h["index"] for h in every]  # all 6 re-ranked candidates
    for query, result in zip(queries[:2], results):
        expected = pipe(str(query), index=index, top_k=3, rerank=True, rerank_candidates=6)
        assert [h["id"] for h in result["hits"]] == [h["index"] for h in expected]
        assert [h["rerank_score"] for h in result["hits"]] == [h["rerank_score"] for h in expected]


def test_an_upload_is_opened_like_the_same_file(tmp_path):
    """16-bit photos are scaled (not clipped) and a large JPEG is decoded at reduced size for the
    model, exactly as when the file is indexed or searched from disk."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(gray16)
    opened = np.asarray(decode_image(gray16.read_bytes(), max_pixels=10**6))
    np.testing.assert_array_equal(opened, np.asarray(open_image(gray16)))
    np.testing.assert_array_equal(opened[..., 0], (ramp.astype(np.float64) * 255 / 65535).round().astype(np.uint8))
    rng = np.random.default_rng(0)
    photo = tmp_path / "large.jpg"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((800, 600)).save(photo, quality=90)
    size = (56, 56)
    upload = decode_image(photo.read_bytes(), max_pixels=10**7, size=size)
    assert upload.size == (200, 150)  # DCT-scaled by 1/4, still at least twice the model size
    np.testing.assert_array_equal(np.asarray(upload), np.asarray(open_image(photo, size)))


def test_a_taken_port_is_refused_before_anything_loads(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The index does not even exist: the port is checked first.
        assert main(["serve", "--index", "missing.vprindex", "--port", str(port)]) == 2
    assert capsys.readouterr().err == f"vprhub serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
