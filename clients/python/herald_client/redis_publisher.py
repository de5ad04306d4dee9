"""Publish session events to herald through Redis (the ``{prefix}:ingest`` stream).

Each call adds one stream entry whose ``payload`` field is
``{"sessionId", "event", "data", "idempotencyKey"?}`` or, for a batch,
``{"sessionId", "events": [...]}``. Whichever herald node reads the entry validates it,
assigns ``seq`` and broadcasts it; refused entries are described in
``{prefix}:ingest:errors``. An idempotency key makes a retried publish harmless: herald
logs an event whose key it already accepted for that session only once.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable, Mapping, Optional

import redis

EVENTS = ("progress", "model_result", "clarification", "completed", "error")


class RedisPublisher:
    """Publishes events for herald sessions through Redis.

    >>> pub = RedisPublisher("redis://127.0.0.1:6379")
    >>> pub.publish("job-42", "progress", {"status": "PROCESSING", "progress": 10})
    """

    def __init__(
        self,
        url: str,
        prefix: str = "herald",
        retries: int = 3,
        backoff: float = 0.2,
        max_stream_length: int = 100_000,
    ) -> None:
        self._redis = redis.Redis.from_url(url)
        self._stream = f"{prefix}:ingest"
        self._retries = retries
        self._backoff = backoff
        self._max_len = max_stream_length

    def publish(
        self,
        session_id: str,
        event: str,
        data: Mapping[str, Any],
        idempotency_key: Optional[str] = None,
    ) -> str:
        """Publishes one event; returns the idempotency key it carried.

        Without a key, a fresh one is generated, so retries of this call (inside it) stay
        harmless; pass your own key (e.g. ``f"{job}:{page}"``) to make retries across
        process restarts harmless too.
        """
        key = idempotency_key or uuid.uuid4().hex
        self._add({"sessionId": session_id, "event": _checked(event), "data": dict(data), "idempotencyKey": key})
        return key

    def publish_batch(self, session_id: str, events: Iterable[Mapping[str, Any]]) -> None:
        """Publishes ``[{"event", "data", "idempotencyKey"?}, ...]`` all-or-nothing."""
        items = []
        for item in events:
            entry = {"event": _checked(item["event"]), "data": dict(item["data"])}
            entry["idempotencyKey"] = item.get("idempotencyKey") or uuid.uuid4().hex
            items.append(entry)
        self._add({"sessionId": session_id, "events": items})

    def _add(self, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"))
        for attempt in range(self._retries + 1):
            try:
                self._redis.xadd(self._stream, {"payload": body}, maxlen=self._max_len, approximate=True)
                return
            except redis.ConnectionError:
                if attempt == self._retries:
                    raise
                time.sleep(self._backoff * 2**attempt)

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> "RedisPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(event: str) -> str:
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}: expected one of {', '.join(EVENTS)}")
    return event
