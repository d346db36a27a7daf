"""The error every part of the Serve app raises for a bad request (the app's handler turns it into a
one-line JSON answer with its status and headers)."""

from __future__ import annotations

import math


class RequestError(Exception):
    """A bad request: HTTP status, a one-line message, and headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
