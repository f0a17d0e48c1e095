"""``vprhub serve``: a localisation service over one place index, with dynamic batching and a page to try it.

* :mod:`.settings` — the service's limits and the bind / API-key rule;
* :mod:`.uploads` — safe decoding of uploaded photos;
* :mod:`.searcher` — the model and the index: a batch of photos in, hits out;
* :mod:`.batching` — one bounded queue and one worker that gathers requests into model batches;
* :mod:`.app` — the FastAPI application (``/search``, ``/health``, ``/info``, ``/images/{id}``, the page).
"""

from .app import create_app
from .searcher import PlaceSearcher
from .settings import ServeSettings

__all__ = ["PlaceSearcher", "ServeSettings", "create_app"]
