"""Errors raised by the herald client."""

from __future__ import annotations

from typing import Any, Optional


class HeraldError(Exception):
    """A refused request: the HTTP status (``None`` for socket refusals and connection
    failures), herald's error ``code`` (e.g. ``SESSION_NOT_FOUND``) and its message."""

    def __init__(self, status: Optional[int], code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_body(cls, status: Optional[int], body: Any) -> "HeraldError":
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(status, str(err.get("code") or "UNKNOWN"), str(err.get("message") or ""))
        return cls(status, "HTTP_ERROR", str(body)[:500])
