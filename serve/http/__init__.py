"""The HTTP layer: FastAPI routes by concern over a ``Backend``, with no Ray in sight."""

from mmembed.serve.http.app import create_app
from mmembed.serve.http.backend import Backend
from mmembed.serve.http.errors import ApiError

__all__ = ["ApiError", "Backend", "create_app"]
