"""Transport-agnostic subscription bookkeeping shared by the sync and asyncio clients.

Per session it remembers the last delivered ``seq`` and the log's ``epoch``, stashes
events that arrive while a (re)subscribe is unanswered or out of order (python-socketio
runs each incoming message in its own thread/task), drops ``seq <= last`` and delivers the
rest strictly in ``seq`` order through a queue drained by one dispatcher.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import HeraldAuthError, HeraldError, make_error
from .events import EVENT_NAMES, Event, parse_event

log = logging.getLogger("herald_client")

EventCallback = Callable[[Event], Any]
ResyncCallback = Callable[[Dict[str, Any]], Any]


class Subscription:
    """One followed session. ``last_seq``/``epoch`` are what the client resumes from."""

    def __init__(self, client: Any, session_id: str, on_event: Optional[EventCallback],
                 on_resync: Optional[ResyncCallback], handlers: Dict[str, EventCallback],
                 last_seq: Optional[int], epoch: Optional[str]) -> None:
        self._client = client
        self.session_id = session_id
        self.on_event = on_event
        self.on_resync = on_resync
        self.handlers = handlers
        self.last_seq = last_seq
        self.epoch = epoch
        self.awaiting = True
        self.pending: Dict[int, Event] = {}
        self.generation = 0
        self.active = True
        self.error: Optional[HeraldError] = None
        self.acked = threading.Event()
        self.resyncs = 0

    def unsubscribe(self) -> Any:
        return self._client.unsubscribe(self.session_id)

    def __repr__(self) -> str:
        return f"Subscription({self.session_id!r}, last_seq={self.last_seq}, epoch={self.epoch!r})"


# ("event", sub, Event) | ("resync", sub, head) | ("protocol_error", None, payload)
# | ("auth_error", sub or None, HeraldAuthError)
Action = Tuple[str, Subscription, Any]


class SessionFeed:
    """The session feed (SPEC §6): every session the client may read, then each change, on
    every node. ``sessions`` is the list, newest first; ``synced`` is false from a drop
    until the fresh list of the reconnect arrived (the feed has no ``seq``: the fresh list
    is the resync). ``on_sessions(list)`` runs after each list and each change,
    ``on_session(entry)`` after each change, on the client's dispatcher."""

    def __init__(self, client: Any, on_sessions: Optional[Callable[[List[Dict[str, Any]]], Any]],
                 on_session: Optional[Callable[[Dict[str, Any]], Any]]) -> None:
        self._client = client
        self.on_sessions = on_sessions
        self.on_session = on_session
        self._lock = threading.Lock()
        self._map: Dict[str, Dict[str, Any]] = {}
        self.synced = False
        self.truncated = False
        self.active = True
        self.listed = threading.Event()

    @property
    def sessions(self) -> List[Dict[str, Any]]:
        with self._lock:
            return sorted(self._map.values(), key=lambda s: str(s.get("createdAt", "")), reverse=True)

    def stop(self) -> Any:
        """Stops following (with the async client: a coroutine to await)."""
        return self._client.unfollow_sessions()

    def _list(self, payload: Any) -> bool:
        if not self.active or not isinstance(payload, dict) or not isinstance(payload.get("sessions"), list):
            return False
        with self._lock:
            self._map = {s["sessionId"]: s for s in payload["sessions"] if isinstance(s, dict) and "sessionId" in s}
            self.synced = True
            self.truncated = payload.get("truncated") is True
        self.listed.set()
        return True

    def _change(self, entry: Any) -> bool:
        if not self.active or not isinstance(entry, dict) or not isinstance(entry.get("sessionId"), str):
            return False
        with self._lock:
            self._map[entry["sessionId"]] = entry
        return True

    def __repr__(self) -> str:
        return f"SessionFeed(sessions={len(self._map)}, synced={self.synced})"


class _Core:
    def __init__(self, enqueue: Callable[[Action], None],
                 on_protocol_error: Optional[Callable[[Dict[str, Any]], Any]],
                 on_auth_error: Optional[Callable[[HeraldAuthError], Any]] = None) -> None:
        self._lock = threading.RLock()
        self._subs: Dict[str, Subscription] = {}
        self._connected = False
        self._enqueue = enqueue
        self._on_protocol_error = on_protocol_error
        self._on_auth_error = on_auth_error
        # herald said the socket's token expired (it disconnects it next); cleared on connect
        self._token_expired = False
        self._feed: Optional[SessionFeed] = None

    # -- outgoing -------------------------------------------------------------------
    def _payload(self, sub: Subscription) -> Tuple[Dict[str, Any], int]:
        """Marks ``sub`` awaiting an ack; returns the subscribe payload and its generation."""
        sub.generation += 1
        sub.awaiting = True
        sub.pending.clear()
        payload: Dict[str, Any] = {"sessionId": sub.session_id}
        if sub.last_seq is not None:
            payload["lastSeq"] = sub.last_seq
            if sub.epoch:
                payload["epoch"] = sub.epoch
        return payload, sub.generation

    def _on_connected(self) -> List[Tuple[Subscription, Dict[str, Any], int]]:
        with self._lock:
            self._connected = True
            self._token_expired = False
            return [(s, *self._payload(s)) for s in self._subs.values() if s.active]

    def _on_disconnected(self) -> None:
        with self._lock:
            self._connected = False
            if self._feed is not None:
                self._feed.synced = False
            for sub in self._subs.values():
                sub.awaiting = True
                sub.pending.clear()

    def _watching(self) -> bool:
        """Whether a (re)connect must ask for the session feed again."""
        return self._feed is not None and self._feed.active

    def _start_feed(self, on_sessions: Any, on_session: Any) -> SessionFeed:
        with self._lock:
            if self._feed is not None:
                self._feed.active = False
            self._feed = SessionFeed(self, on_sessions, on_session)
            return self._feed

    def _end_feed(self) -> bool:
        """Forgets the feed; whether there was one to unsubscribe on the server."""
        with self._lock:
            feed, self._feed = self._feed, None
        if feed is None:
            return False
        feed.active = False
        return True

    def _on_feed_list(self, payload: Any = None, *_: Any) -> None:
        feed = self._feed
        if feed is not None and feed._list(payload):
            self._enqueue(("feed_sessions", feed, None))

    def _on_feed_change(self, entry: Any = None, *_: Any) -> None:
        feed = self._feed
        if feed is not None and feed._change(entry):
            self._enqueue(("feed_session", feed, entry))

    # -- incoming -------------------------------------------------------------------
    def _ack_callback(self, sub: Subscription, generation: int) -> Callable[..., None]:
        def callback(*args: Any) -> None:
            self._handle_ack(sub, generation, args[0] if args else None)
        return callback

    def _handle_ack(self, sub: Subscription, generation: int, ack: Any) -> None:
        with self._lock:
            if generation != sub.generation or not sub.active:
                return
            if not isinstance(ack, dict) or not ack.get("ok"):
                err = ack.get("error", {}) if isinstance(ack, dict) else {}
                if not isinstance(err, dict):
                    err = {}
                sub.error = make_error(None, str(err.get("code", "SUBSCRIBE_FAILED")), str(err.get("message", ack)))
                sub.active = False
                self._subs.pop(sub.session_id, None)
                if sub.acked.is_set() and isinstance(sub.error, HeraldAuthError):
                    # a re-subscribe after a reconnect (no subscribe() call waits for it): the
                    # new token does not cover the session any more
                    self._enqueue(("auth_error", sub, sub.error))
                sub.acked.set()
                return
            head = int(ack.get("lastSeq") or 0)
            if ack.get("epoch"):
                sub.epoch = ack["epoch"]
            if sub.last_seq is None:
                sub.last_seq = head
            elif ack.get("recovered") is False:
                sub.last_seq = head
                sub.resyncs += 1
                self._enqueue(("resync", sub, head))
            sub.awaiting = False
            self._drain(sub)
            sub.acked.set()

    def _handle_event(self, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if data.get("seq") is None:
            if name == "error" and data.get("code") == "TOKEN_EXPIRED" and not data.get("sessionId"):
                # the socket's token expired: herald disconnects it next
                self._token_expired = True
                self._enqueue(("auth_error", None, HeraldAuthError("TOKEN_EXPIRED", str(data.get("error") or ""))))
            if name == "error" and self._on_protocol_error is not None:
                self._enqueue(("protocol_error", None, data))  # type: ignore[arg-type]
            elif name == "error":
                log.warning("herald refused a request: %s", data)
            return
        try:
            event = parse_event(name, data)
            seq = int(data["seq"])
        except Exception:  # a malformed event must not kill the client
            log.exception("cannot parse %s event %r", name, data)
            return
        with self._lock:
            sub = self._subs.get(event.session_id)
            if sub is None or not sub.active:
                return
            if sub.awaiting:
                sub.pending[seq] = event
                return
            if seq <= (sub.last_seq or 0):
                return
            sub.pending[seq] = event
            self._drain(sub)

    def _drain(self, sub: Subscription) -> None:
        last = sub.last_seq or 0
        for seq in [s for s in sub.pending if s <= last]:
            del sub.pending[seq]
        while last + 1 in sub.pending:
            last += 1
            self._enqueue(("event", sub, sub.pending.pop(last)))
        sub.last_seq = last

    # -- registration -----------------------------------------------------------------
    def _register(self, session_id: str, on_event: Optional[EventCallback], on_resync: Optional[ResyncCallback],
                  handlers: Dict[str, Optional[EventCallback]], last_seq: Optional[int], epoch: Optional[str]
                  ) -> Tuple[Subscription, Optional[Tuple[Dict[str, Any], int]]]:
        for name in handlers:
            if name not in EVENT_NAMES:
                raise ValueError(f"unknown event {name!r}")
        sub = Subscription(self, session_id, on_event, on_resync,
                           {k: v for k, v in handlers.items() if v is not None}, last_seq, epoch)
        with self._lock:
            old = self._subs.get(session_id)
            if old is not None:
                old.active = False
            self._subs[session_id] = sub
            return sub, (self._payload(sub) if self._connected else None)

    def _forget(self, sub: Subscription) -> None:
        """Drops a subscription whose subscribe() failed before it was sent."""
        with self._lock:
            sub.active = False
            if self._subs.get(sub.session_id) is sub:
                del self._subs[sub.session_id]

    def _unregister(self, session_id: str) -> bool:
        with self._lock:
            sub = self._subs.pop(session_id, None)
            if sub is not None:
                sub.active = False
            return sub is not None and self._connected

    @property
    def subscriptions(self) -> Dict[str, Subscription]:
        with self._lock:
            return dict(self._subs)


def feed_callbacks(kind: str, feed: SessionFeed, entry: Any) -> List[Tuple[Callable[..., Any], Any]]:
    """What a dispatcher calls for a feed action."""
    calls: List[Tuple[Callable[..., Any], Any]] = []
    if kind == "feed_session" and feed.on_session is not None:
        calls.append((feed.on_session, entry))
    if feed.on_sessions is not None:
        calls.append((feed.on_sessions, feed.sessions))
    return calls


def feed_refusal(ack: Any) -> Optional[Exception]:
    """The error of a refused feed subscribe, None when it was accepted."""
    if isinstance(ack, dict) and ack.get("ok") is True:
        return None
    error = ack.get("error") if isinstance(ack, dict) else None
    code = error.get("code", "INTERNAL") if isinstance(error, dict) else "INTERNAL"
    message = error.get("message", "feed refused") if isinstance(error, dict) else "bad feed ack"
    return make_error(None, code, message)


def targets(sub: Subscription, event: Event) -> List[EventCallback]:
    out = []
    if sub.on_event is not None:
        out.append(sub.on_event)
    handler = sub.handlers.get(event.event)
    if handler is not None:
        out.append(handler)
    return out
