"""Publish a session's events to herald over HTTP (``POST /api/sessions/{id}/events``)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional

import requests

from . import _auth, _http
from .errors import HeraldError
from .events import EVENT_NAMES

RETRY_STATUSES = frozenset({500, 502, 503, 504})


class HeraldPublisher:
    """For workers: each call posts one event (or a batch) with an idempotency key, and
    retries on connection errors and 5xx answers with exponential backoff. herald logs an
    event whose key it already accepted for the session only once, so a retry whose first
    attempt did get through is harmless. Keys are generated per call unless you pass
    ``idempotency_key`` (e.g. ``f"{job}:page-{n}"``, harmless across worker restarts too).

    Returns herald's answer: ``{"accepted", "duplicates", "lastSeq", "seqs"}``.
    Field names may be given in snake_case (``has_clarifications=True``): top-level keys
    are sent in camelCase.

    Credentials: ``api_key`` (a key with the ``publish`` scope) or ``token`` (a JWT with
    ``publish`` whose ``sessions`` cover the session, or a callable returning a fresh one,
    called before every attempt), sent as ``Authorization: Bearer``. A refusal (401, 403)
    raises :class:`HeraldAuthError` at once, without retries.
    """

    def __init__(self, url: str, api_key: Optional[str] = None, *, token: Optional[_auth.TokenSource] = None,
                 retries: int = 3, backoff: float = 0.2, timeout: float = 10.0,
                 session: Optional[requests.Session] = None) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._http = session or requests.Session()
        self._token = _auth.credential_source(token, api_key)

    # -- one call per event type -------------------------------------------------------
    def progress(self, session_id: str, *, idempotency_key: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        """``status`` (ACTIVE, PROCESSING, COMPLETED, FAILED, EXPIRED), ``progress`` (0-100),
        optional ``prompts``, ``has_clarifications``, ``clarification_count``, extra fields."""
        return self.publish(session_id, "progress", _http.camel_fields(fields), idempotency_key)

    def model_result(self, session_id: str, *, idempotency_key: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        """``prompt_id``, ``model_name``, ``status`` (processing, completed, failed), optional
        ``provider``, ``duration``, ``result``, ``error``."""
        return self.publish(session_id, "model_result", _http.camel_fields(fields), idempotency_key)

    def clarification(self, session_id: str, *, idempotency_key: Optional[str] = None,
                      **fields: Any) -> Dict[str, Any]:
        """``clarification_id``, ``question``, ``status`` (pending, answered, expired), ``answer``."""
        return self.publish(session_id, "clarification", _http.camel_fields(fields), idempotency_key)

    def completed(self, session_id: str, result: Mapping[str, Any], *, idempotency_key: Optional[str] = None,
                  **fields: Any) -> Dict[str, Any]:
        return self.publish(session_id, "completed", {"result": dict(result), **_http.camel_fields(fields)},
                            idempotency_key)

    def error(self, session_id: str, error: str, *, code: Optional[str] = None,
              idempotency_key: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        data: Dict[str, Any] = {"error": error, **_http.camel_fields(fields)}
        if code is not None:
            data["code"] = code
        return self.publish(session_id, "error", data, idempotency_key)

    # -- generic -------------------------------------------------------------------------
    def publish(self, session_id: str, event: str, data: Mapping[str, Any],
                idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """Posts one event (``data`` sent as is)."""
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}: expected one of {', '.join(EVENT_NAMES)}")
        return self._post(session_id, _http.ingest_item(event, data, idempotency_key))

    def publish_batch(self, session_id: str, events: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """Posts ``[{"event", "data", "idempotencyKey"?}, ...]``: all logged, or none."""
        items: List[Dict[str, Any]] = []
        for item in events:
            if item["event"] not in EVENT_NAMES:
                raise ValueError(f"unknown event {item['event']!r}")
            items.append(_http.ingest_item(item["event"], item["data"], item.get("idempotencyKey")))
        return self._post(session_id, items)

    def _post(self, session_id: str, body: Any) -> Dict[str, Any]:
        url = f"{self.url}/api/sessions/{_http.session_path(session_id)}/events"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            headers = _auth.bearer(_auth.resolve(self._token))
            try:
                r = self._http.post(url, json=body, timeout=self.timeout, headers=headers or None)
            except requests.RequestException as e:
                if last:
                    raise HeraldError(None, "CONNECTION_FAILED", str(e)) from e
            else:
                try:
                    answer = r.json()
                except ValueError:
                    answer = r.text
                if r.status_code < 400:
                    return answer
                if r.status_code not in RETRY_STATUSES or last:
                    raise HeraldError.from_body(r.status_code, answer)
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def new_key() -> str:
        return uuid.uuid4().hex

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HeraldPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
