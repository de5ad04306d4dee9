"""Synchronous herald client, on ``socketio.Client`` and ``requests``."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import requests
import socketio

from . import _auth, _http
from ._core import Action, EventCallback, ResyncCallback, SessionFeed, Subscription, _Core, feed_callbacks, feed_refusal, targets
from .errors import HeraldAuthError, HeraldError, from_connect_error
from .events import EVENT_NAMES

log = logging.getLogger("herald_client")


class HeraldClient(_Core):
    """Follows herald sessions over Socket.IO and calls its HTTP API.

    Options: ``transports`` (e.g. ``["websocket"]``), ``request_timeout`` (s, HTTP),
    ``connect_timeout`` (s), ``reconnection_delay`` / ``reconnection_delay_max`` (s),
    ``headers`` (extra HTTP/handshake headers), ``token`` (a JWT or API key, or a callable
    returning a fresh one: called on every (re)connect and before every HTTP call),
    ``api_key`` (the same as a static ``token``), ``on_protocol_error`` (called with
    refused-request ``error`` payloads, which have no seq), ``on_auth_error`` (called with
    a :class:`HeraldAuthError` for auth failures no call of yours raises: a token expiring
    on the live socket, a refused reconnect or re-subscribe).

    Callbacks run one at a time, in ``seq`` order, on the client's dispatcher thread.
    """

    def __init__(self, url: str, *, transports: Optional[List[str]] = None, request_timeout: float = 10.0,
                 connect_timeout: float = 10.0, reconnection_delay: float = 0.2, reconnection_delay_max: float = 5.0,
                 headers: Optional[Mapping[str, str]] = None, api_key: Optional[str] = None,
                 token: Optional[_auth.TokenSource] = None, on_protocol_error: Optional[Any] = None,
                 on_auth_error: Optional[Callable[[HeraldAuthError], Any]] = None) -> None:
        self._queue: "queue.Queue[Optional[Action]]" = queue.Queue()
        super().__init__(self._queue.put, on_protocol_error, on_auth_error)
        self._token = _auth.credential_source(token, api_key)
        self.url = url.rstrip("/")
        self._transports = transports
        self._timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._delay = reconnection_delay
        self._delay_max = reconnection_delay_max
        self._headers = dict(headers or {})
        self._http = requests.Session()
        self._http.headers.update(self._headers)
        self._closed = False
        self._connect_lock = threading.Lock()
        self._reconnecting = False
        self._connecting = False
        self._refusal: Optional[HeraldError] = None  # the last connect_error, as an error
        self._token_failure: Optional[BaseException] = None  # the token callable raised
        self._sio = socketio.Client(reconnection=True, reconnection_delay=reconnection_delay,
                                    reconnection_delay_max=reconnection_delay_max, logger=False, engineio_logger=False)
        self._sio.on("connect", self._on_connect)
        self._sio.on("connect_error", self._on_connect_error)
        self._sio.on("disconnect", self._on_disconnect)
        for name in EVENT_NAMES:
            self._sio.on(name, self._make_handler(name))
        self._sio.on("sessions", self._on_feed_list)
        self._sio.on("session", self._on_feed_change)
        self._dispatcher = threading.Thread(target=self._dispatch, name="herald-dispatch", daemon=True)
        self._dispatcher.start()

    # -- connection ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sio.connected

    def connect(self) -> None:
        """Connects (subscribe() does this by itself). Reconnects happen automatically.

        Raises :class:`HeraldAuthError` when herald refuses the credential, or what the
        token callable raised."""
        with self._connect_lock:
            if self._sio.connected:
                return
            kwargs: Dict[str, Any] = {"wait_timeout": self._connect_timeout, "headers": self._headers,
                                      "auth": self._socket_auth}
            if self._transports:
                kwargs["transports"] = self._transports
            # python-socketio reports a disconnect before its Engine.IO client has closed,
            # and refuses to connect until it has
            deadline = time.monotonic() + self._connect_timeout
            while self._sio.eio.state != "disconnected" and time.monotonic() < deadline:
                time.sleep(0.01)
            self._refusal = None
            self._token_failure = None
            self._connecting = True
            try:
                self._sio.connect(self.url, **kwargs)
            except (socketio.exceptions.ConnectionError, ValueError) as e:
                if self._token_failure is not None:
                    raise self._token_failure
                if self._refusal is not None:
                    raise self._refusal from e
                raise HeraldError(None, "CONNECTION_FAILED", str(e)) from e
            finally:
                self._connecting = False

    def _socket_auth(self) -> Dict[str, str]:
        """socket.io's ``auth``, fetched on every (re)connect python-socketio makes."""
        try:
            token = _auth.resolve(self._token)
        except Exception as e:
            self._token_failure = e
            log.warning("the token callable failed: %r", e)
            return {}
        return {"token": token} if token else {}

    def _on_connect_error(self, data: Any = None, *_: Any) -> None:
        self._refusal = from_connect_error(data)
        if not self._connecting and isinstance(self._refusal, HeraldAuthError):
            self._queue.put(("auth_error", None, self._refusal))  # python-socketio's own reconnect

    def _on_connect(self) -> None:
        for sub, payload, gen in self._on_connected():
            self._sio.emit("subscribe", payload, callback=self._ack_callback(sub, gen))
        if self._watching():
            self._sio.emit("subscribe", {"feed": "sessions"})

    def _on_disconnect(self, reason: Any = None) -> None:
        self._on_disconnected()
        # A server-side disconnect (a token expiring, a node draining) is not retried by
        # python-socketio. Reconnecting with a static token that expired cannot succeed.
        if reason == socketio.Client.reason.SERVER_DISCONNECT and not self._closed and not self._reconnecting:
            if self._token_expired and not callable(self._token):
                log.warning("herald disconnected the socket: its token expired (pass token= a callable to refresh)")
                return
            self._reconnecting = True
            threading.Thread(target=self._reconnect_loop, name="herald-reconnect", daemon=True).start()

    def _reconnect_loop(self) -> None:
        delay = self._delay
        try:
            while not self._closed:
                time.sleep(delay)
                if self._closed or self._sio.connected:
                    return
                if self._token_expired and not callable(self._token):
                    return
                try:
                    self.connect()
                    return
                except HeraldAuthError as e:
                    self._queue.put(("auth_error", None, e))
                    if not callable(self._token):
                        return  # the same credential again cannot do better
                    log.debug("reconnect refused: %s", e)
                except Exception as e:  # keep trying until closed
                    log.debug("reconnect failed: %s", e)
                delay = min(delay * 2, self._delay_max)
        finally:
            self._reconnecting = False

    def _make_handler(self, name: str):
        def handler(data: Any = None, *_: Any) -> None:
            self._handle_event(name, data)
        return handler

    # -- subscriptions ---------------------------------------------------------------
    def subscribe(self, session_id: str, on_event: Optional[EventCallback] = None,
                  on_resync: Optional[ResyncCallback] = None, *, last_seq: Optional[int] = 0,
                  epoch: Optional[str] = None, on_progress: Optional[EventCallback] = None,
                  on_model_result: Optional[EventCallback] = None, on_clarification: Optional[EventCallback] = None,
                  on_completed: Optional[EventCallback] = None, on_error: Optional[EventCallback] = None,
                  timeout: Optional[float] = None) -> Subscription:
        """Follows ``session_id``: every event after ``last_seq`` (0: the whole retained log;
        ``None``: only new events), exactly once and in order, across reconnects.

        ``on_resync(snapshot)`` is called when the missed events are no longer retained
        (or the log was recreated); delivery then continues from the snapshot's head.
        Waits for herald's answer and raises :class:`HeraldError` if it refuses.
        """
        handlers = {"progress": on_progress, "model_result": on_model_result, "clarification": on_clarification,
                    "completed": on_completed, "error": on_error}
        sub, send = self._register(session_id, on_event, on_resync, handlers, last_seq, epoch)
        if send is not None:
            self._sio.emit("subscribe", send[0], callback=self._ack_callback(sub, send[1]))
        else:
            try:
                self.connect()
            except Exception:
                self._forget(sub)
                raise
        if not sub.acked.wait(timeout or self._timeout):
            raise HeraldError(None, "TIMEOUT", f"no answer to subscribe {session_id!r}")
        if sub.error is not None:
            raise sub.error
        return sub

    def unsubscribe(self, session_id: str) -> None:
        if self._unregister(session_id):
            self._sio.emit("unsubscribe", {"sessionId": session_id})

    def follow_sessions(self, on_sessions: Optional[Callable[[List[Dict[str, Any]]], Any]] = None,
                        on_session: Optional[Callable[[Dict[str, Any]], Any]] = None, *,
                        timeout: Optional[float] = None) -> SessionFeed:
        """Follows the session feed ("all my jobs", SPEC §6): returns once the first list
        arrived; kept up to date, and refetched after every reconnect. One feed per client
        (following again replaces it)."""
        feed = self._start_feed(on_sessions, on_session)
        answer: Dict[str, Any] = {}
        answered = threading.Event()

        def on_ack(*args: Any) -> None:
            answer["ack"] = args[0] if args else None
            answered.set()

        if not self._sio.connected:
            self.connect()  # the connect handler asks for the feed
        if self._sio.connected:
            self._sio.emit("subscribe", {"feed": "sessions"}, callback=on_ack)
            if answered.wait(timeout or self._timeout):
                refusal = feed_refusal(answer.get("ack"))
                if refusal is not None:
                    self._end_feed()
                    raise refusal
        if not feed.listed.wait(timeout or self._timeout):
            raise HeraldError(None, "TIMEOUT", "no session list from herald")
        return feed

    def unfollow_sessions(self) -> None:
        if self._end_feed() and self._sio.connected:
            self._sio.emit("unsubscribe", {"feed": "sessions"})

    def _dispatch(self) -> None:
        while True:
            action = self._queue.get()
            if action is None:
                return
            kind, sub, arg = action
            try:
                if kind == "event":
                    for cb in targets(sub, arg):
                        cb(arg)
                elif kind == "resync":
                    if sub.on_resync is not None:
                        sub.on_resync(self.get_session(sub.session_id))
                elif kind in ("feed_sessions", "feed_session"):
                    for cb, value in feed_callbacks(kind, sub, arg):
                        cb(value)
                elif kind == "protocol_error" and self._on_protocol_error is not None:
                    self._on_protocol_error(arg)
                elif kind == "auth_error":
                    if self._on_auth_error is not None:
                        self._on_auth_error(arg)
                    else:
                        log.warning("herald: %s", arg)
            except Exception:
                log.exception("herald callback failed")

    # -- HTTP API --------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = _auth.bearer(_auth.resolve(self._token))
        try:
            r = self._http.request(method, self.url + path, timeout=self._timeout, headers=headers or None, **kwargs)
        except requests.RequestException as e:
            raise HeraldError(None, "CONNECTION_FAILED", str(e)) from e
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise HeraldError.from_body(r.status_code, body)
        return body

    def create_session(self, prompts: Iterable[_http.PromptSpec], models: Optional[Iterable[str]] = None,
                       strategy: Optional[str] = None, metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Creates and starts an orchestrated session; returns its snapshot (``sessionId`` …)."""
        return self._request("POST", "/api/wizard/sessions",
                             json=_http.create_body(prompts, models, strategy, metadata))

    def get_session(self, session_id: str) -> Dict[str, Any]:
        return self._request("GET", f"/api/wizard/session/{_http.session_path(session_id)}")

    def get_events(self, session_id: str, after: int = 0, limit: int = 100) -> Dict[str, Any]:
        return self._request("GET", f"/api/wizard/session/{_http.session_path(session_id)}/events",
                             params={"after": after, "limit": limit})

    def list_sessions(self, status: Optional[str] = None) -> List[Dict[str, Any]]:
        return self._request("GET", "/api/wizard/sessions", params={"status": status} if status else None)["sessions"]

    def models(self) -> List[Dict[str, Any]]:
        return self._request("GET", "/api/models")["models"]

    def respond(self, session_id: str, clarification_id: str, answer: str) -> Any:
        return self._request("POST", "/api/wizard/clarifications/respond",
                             json={"sessionId": session_id, "clarificationId": clarification_id, "answer": answer})

    def cancel(self, session_id: str) -> Dict[str, Any]:
        return self._request("POST", f"/api/wizard/session/{_http.session_path(session_id)}/cancel")

    # -- lifecycle -------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks while connected (like ``socketio.Client.wait``)."""
        self._sio.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sio.disconnect()
        except Exception:
            pass
        self._queue.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=5)
        self._http.close()

    def __enter__(self) -> "HeraldClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
