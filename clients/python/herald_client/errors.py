"""Errors raised by the herald client."""

from __future__ import annotations

from typing import Any, Optional

#: The codes of :class:`HeraldAuthError`: no or unknown credential, a token herald cannot
#: accept, an expired token (get a fresh one), a valid credential without the right.
AUTH_CODES = frozenset({"UNAUTHORIZED", "INVALID_TOKEN", "TOKEN_EXPIRED", "FORBIDDEN"})


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
        """The error an HTTP answer describes (``{"error": {"code", "message"}}``); a 401 or
        403 (or an auth code) is a :class:`HeraldAuthError`."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return make_error(status, str(err.get("code") or "UNKNOWN"), str(err.get("message") or ""))
        # not herald's shape (a proxy or gateway answering): the status still says what it is
        if status == 401:
            return HeraldAuthError("UNAUTHORIZED", str(body)[:500], status)
        if status == 403:
            return HeraldAuthError("FORBIDDEN", str(body)[:500], status)
        return cls(status, "HTTP_ERROR", str(body)[:500])


class HeraldAuthError(HeraldError):
    """herald refused the credential, or what it allows: ``code`` is one of
    ``UNAUTHORIZED`` (no credential, or one herald does not know), ``INVALID_TOKEN`` (bad
    signature, audience, issuer, format...), ``TOKEN_EXPIRED`` (get a fresh token) or
    ``FORBIDDEN`` (valid, but not allowed this session or action). ``status`` is the HTTP
    status (401 / 403) for HTTP calls, ``None`` for Socket.IO refusals."""

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(status, code, message)


def make_error(status: Optional[int], code: str, message: str) -> HeraldError:
    """A :class:`HeraldAuthError` for the auth codes (and any 401 / 403), else a
    :class:`HeraldError`."""
    if code in AUTH_CODES:
        return HeraldAuthError(code, message, status)
    if status in (401, 403):
        return HeraldAuthError("UNAUTHORIZED" if status == 401 else "FORBIDDEN", f"{code}: {message}", status)
    return HeraldError(status, code, message)


def from_connect_error(data: Any) -> HeraldError:
    """The refusal a Socket.IO ``connect_error`` carries: herald's message starts with the
    code (``"TOKEN_EXPIRED: the token has expired; ..."``)."""
    message = data.get("message") if isinstance(data, dict) else data
    message = str(message) if message else "the connection was refused"
    code, sep, rest = message.partition(": ")
    if sep and code in AUTH_CODES:
        return HeraldAuthError(code, rest)
    return HeraldError(None, "CONNECTION_FAILED", message)
