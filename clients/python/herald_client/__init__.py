"""herald client for Python.

- :class:`HeraldClient` / :class:`AsyncHeraldClient`: follow sessions over Socket.IO
  (typed events, gap-free resubscription after reconnects) and call the HTTP API.
- :class:`HeraldPublisher`: workers post their sessions' events over HTTP, with retries
  and idempotency keys.
- :class:`RedisPublisher`: workers publish through Redis (the ``{prefix}:ingest`` stream)
  into a herald cluster instead.
"""

from .errors import AUTH_CODES, HeraldAuthError, HeraldError
from .events import Clarification, Completed, Error, Event, ModelResult, Progress, PromptCounts, SessionEvent, parse_event
from ._core import SessionFeed, Subscription
from .redis_publisher import RedisPublisher

__all__ = [
    "AUTH_CODES", "AsyncHeraldClient", "Clarification", "Completed", "Error", "Event", "HeraldAuthError",
    "HeraldClient", "HeraldError",
    "HeraldPublisher", "ModelResult", "Progress", "PromptCounts", "RedisPublisher", "SessionEvent", "SessionFeed",
    "Subscription", "parse_event",
]


def __getattr__(name: str):
    # The socket/HTTP clients need python-socketio, requests and aiohttp; importing them
    # lazily keeps `from herald_client import RedisPublisher` working with redis alone.
    if name == "HeraldClient":
        from .client import HeraldClient
        return HeraldClient
    if name == "AsyncHeraldClient":
        from .async_client import AsyncHeraldClient
        return AsyncHeraldClient
    if name == "HeraldPublisher":
        from .publisher import HeraldPublisher
        return HeraldPublisher
    raise AttributeError(name)
