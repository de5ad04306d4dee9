"""Credentials: a token (or API key) given as a string or as a callable returning one."""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Optional, Union

#: A token or API key, or a callable returning a fresh one. The callable is called on every
#: (re)connect and before every HTTP call, so it should return a cached token until that
#: is close to expiry.
TokenSource = Union[str, Callable[[], str]]
#: The same for the asyncio client, whose callable may also be a coroutine function.
AsyncTokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]


def credential_source(token: Any, api_key: Optional[str]) -> Any:
    """The one credential a client uses: ``token`` or ``api_key`` (both are sent the same
    way: socket.io ``auth: {token}`` and ``Authorization: Bearer``)."""
    if token is not None and api_key is not None:
        raise ValueError("give either token= or api_key=, not both")
    source = token if token is not None else api_key
    if source is None or callable(source):
        return source
    if isinstance(source, str):
        return source or None
    raise TypeError(f"token must be a str or a callable returning one, not {type(source).__name__}")


def checked(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"the token callable returned {value!r}; it must return a non-empty str")
    return value


def resolve(source: Any) -> Optional[str]:
    """The current credential (sync)."""
    if source is None:
        return None
    if isinstance(source, str):
        return source
    value = source()
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # never awaited: do not warn about it
        raise TypeError("the token callable returned an awaitable: use AsyncHeraldClient for async callables")
    return checked(value)


async def resolve_async(source: Any) -> Optional[str]:
    """The current credential; the callable may be sync or async."""
    if source is None:
        return None
    if isinstance(source, str):
        return source
    value = source()
    if inspect.isawaitable(value):
        value = await value
    return checked(value)


def bearer(token: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}
