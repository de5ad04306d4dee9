"""asyncio herald client, on ``socketio.AsyncClient`` and ``aiohttp``."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import aiohttp
import socketio

from . import _auth, _http
from ._core import Action, EventCallback, ResyncCallback, SessionFeed, Subscription, _Core, feed_callbacks, feed_refusal, targets
from .errors import HeraldAuthError, HeraldError, from_connect_error
from .events import EVENT_NAMES

log = logging.getLogger("herald_client")


async def _call(cb: Any, arg: Any) -> None:
    result = cb(arg)
    if inspect.isawaitable(result):
        await result


class AsyncHeraldClient(_Core):
    """The asyncio twin of :class:`HeraldClient` (same options and methods, awaited).

    Callbacks may be plain functions or coroutine functions; they run one at a time, in
    ``seq`` order, on the client's dispatcher task. ``token`` may also be a coroutine
    function (or any callable returning an awaitable). Create it inside a running loop.
    """

    def __init__(self, url: str, *, transports: Optional[List[str]] = None, request_timeout: float = 10.0,
                 connect_timeout: float = 10.0, reconnection_delay: float = 0.2, reconnection_delay_max: float = 5.0,
                 headers: Optional[Mapping[str, str]] = None, api_key: Optional[str] = None,
                 token: Optional[_auth.AsyncTokenSource] = None, on_protocol_error: Optional[Any] = None,
                 on_auth_error: Optional[Callable[[HeraldAuthError], Any]] = None) -> None:
        self._queue: "asyncio.Queue[Optional[Action]]" = asyncio.Queue()
        super().__init__(self._queue.put_nowait, on_protocol_error, on_auth_error)
        self._token = _auth.credential_source(token, api_key)
        self.url = url.rstrip("/")
        self._transports = transports
        self._timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._delay = reconnection_delay
        self._delay_max = reconnection_delay_max
        self._headers = dict(headers or {})
        self._http: Optional[aiohttp.ClientSession] = None
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._reconnect_task: Optional[asyncio.Task] = None
        self._connecting = False
        self._refusal: Optional[HeraldError] = None
        self._token_failure: Optional[BaseException] = None
        self._sio = socketio.AsyncClient(reconnection=True, reconnection_delay=reconnection_delay,
                                         reconnection_delay_max=reconnection_delay_max, logger=False,
                                         engineio_logger=False)
        self._sio.on("connect", self._on_connect)
        self._sio.on("connect_error", self._on_connect_error)
        self._sio.on("disconnect", self._on_disconnect)
        for name in EVENT_NAMES:
            self._sio.on(name, self._make_handler(name))
        self._sio.on("sessions", self._on_async_feed_list)
        self._sio.on("session", self._on_async_feed_change)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    @property
    def connected(self) -> bool:
        return self._sio.connected

    async def connect(self) -> None:
        """See :meth:`HeraldClient.connect`."""
        async with self._connect_lock:
            if self._sio.connected:
                return
            kwargs: Dict[str, Any] = {"wait_timeout": self._connect_timeout, "headers": self._headers,
                                      "auth": self._socket_auth}
            if self._transports:
                kwargs["transports"] = self._transports
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._connect_timeout
            while self._sio.eio.state != "disconnected" and loop.time() < deadline:
                await asyncio.sleep(0.01)  # see HeraldClient.connect
            self._refusal = None
            self._token_failure = None
            self._connecting = True
            try:
                await self._sio.connect(self.url, **kwargs)
            except (socketio.exceptions.ConnectionError, ValueError) as e:
                if self._token_failure is not None:
                    raise self._token_failure
                if self._refusal is not None:
                    raise self._refusal from e
                raise HeraldError(None, "CONNECTION_FAILED", str(e)) from e
            finally:
                self._connecting = False

    async def _socket_auth(self) -> Dict[str, str]:
        """socket.io's ``auth``; python-socketio awaits it on every (re)connect."""
        try:
            token = await _auth.resolve_async(self._token)
        except Exception as e:
            self._token_failure = e
            log.warning("the token callable failed: %r", e)
            return {}
        return {"token": token} if token else {}

    async def _on_connect_error(self, data: Any = None, *_: Any) -> None:
        self._refusal = from_connect_error(data)
        if not self._connecting and isinstance(self._refusal, HeraldAuthError):
            self._queue.put_nowait(("auth_error", None, self._refusal))

    async def _on_connect(self) -> None:
        for sub, payload, gen in self._on_connected():
            await self._sio.emit("subscribe", payload, callback=self._ack_callback(sub, gen))
        if self._watching():
            await self._sio.emit("subscribe", {"feed": "sessions"})

    async def _on_async_feed_list(self, payload: Any = None, *_: Any) -> None:
        self._on_feed_list(payload)

    async def _on_async_feed_change(self, entry: Any = None, *_: Any) -> None:
        self._on_feed_change(entry)

    async def _on_disconnect(self, reason: Any = None) -> None:
        self._on_disconnected()
        if reason == socketio.AsyncClient.reason.SERVER_DISCONNECT and not self._closed and (
                self._reconnect_task is None or self._reconnect_task.done()):
            if self._token_expired and not callable(self._token):
                log.warning("herald disconnected the socket: its token expired (pass token= a callable to refresh)")
                return
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = self._delay
        while not self._closed:
            await asyncio.sleep(delay)
            if self._closed or self._sio.connected:
                return
            if self._token_expired and not callable(self._token):
                return
            try:
                await self.connect()
                return
            except HeraldAuthError as e:
                self._queue.put_nowait(("auth_error", None, e))
                if not callable(self._token):
                    return
                log.debug("reconnect refused: %s", e)
            except Exception as e:
                log.debug("reconnect failed: %s", e)
            delay = min(delay * 2, self._delay_max)

    def _make_handler(self, name: str):
        async def handler(data: Any = None, *_: Any) -> None:
            self._handle_event(name, data)
        return handler

    async def subscribe(self, session_id: str, on_event: Optional[EventCallback] = None,
                        on_resync: Optional[ResyncCallback] = None, *, last_seq: Optional[int] = 0,
                        epoch: Optional[str] = None, on_progress: Optional[EventCallback] = None,
                        on_model_result: Optional[EventCallback] = None,
                        on_clarification: Optional[EventCallback] = None,
                        on_completed: Optional[EventCallback] = None, on_error: Optional[EventCallback] = None,
                        timeout: Optional[float] = None) -> Subscription:
        """See :meth:`HeraldClient.subscribe`."""
        handlers = {"progress": on_progress, "model_result": on_model_result, "clarification": on_clarification,
                    "completed": on_completed, "error": on_error}
        sub, send = self._register(session_id, on_event, on_resync, handlers, last_seq, epoch)
        if send is not None:
            await self._sio.emit("subscribe", send[0], callback=self._ack_callback(sub, send[1]))
        else:
            try:
                await self.connect()
            except Exception:
                self._forget(sub)
                raise
        deadline = asyncio.get_running_loop().time() + (timeout or self._timeout)
        while not sub.acked.is_set():
            if asyncio.get_running_loop().time() > deadline:
                raise HeraldError(None, "TIMEOUT", f"no answer to subscribe {session_id!r}")
            await asyncio.sleep(0.01)
        if sub.error is not None:
            raise sub.error
        return sub

    async def unsubscribe(self, session_id: str) -> None:
        if self._unregister(session_id):
            await self._sio.emit("unsubscribe", {"sessionId": session_id})

    async def follow_sessions(self, on_sessions: Optional[Callable[[List[Dict[str, Any]]], Any]] = None,
                              on_session: Optional[Callable[[Dict[str, Any]], Any]] = None, *,
                              timeout: Optional[float] = None) -> SessionFeed:
        """Follows the session feed ("all my jobs", SPEC §6); see
        :meth:`HeraldClient.follow_sessions`. Callbacks may be coroutines."""
        feed = self._start_feed(on_sessions, on_session)
        if not self._sio.connected:
            await self.connect()  # the connect handler asks for the feed
        else:
            ack = await self._sio.call("subscribe", {"feed": "sessions"}, timeout=timeout or self._timeout)
            refusal = feed_refusal(ack)
            if refusal is not None:
                self._end_feed()
                raise refusal
        deadline = asyncio.get_running_loop().time() + (timeout or self._timeout)
        while not feed.listed.is_set():
            if asyncio.get_running_loop().time() > deadline:
                raise HeraldError(None, "TIMEOUT", "no session list from herald")
            await asyncio.sleep(0.01)
        return feed

    async def unfollow_sessions(self) -> None:
        if self._end_feed() and self._sio.connected:
            await self._sio.emit("unsubscribe", {"feed": "sessions"})

    async def _dispatch(self) -> None:
        while True:
            action = await self._queue.get()
            if action is None:
                return
            kind, sub, arg = action
            try:
                if kind == "event":
                    for cb in targets(sub, arg):
                        await _call(cb, arg)
                elif kind == "resync":
                    if sub.on_resync is not None:
                        await _call(sub.on_resync, await self.get_session(sub.session_id))
                elif kind in ("feed_sessions", "feed_session"):
                    for cb, value in feed_callbacks(kind, sub, arg):
                        await _call(cb, value)
                elif kind == "protocol_error" and self._on_protocol_error is not None:
                    await _call(self._on_protocol_error, arg)
                elif kind == "auth_error":
                    if self._on_auth_error is not None:
                        await _call(self._on_auth_error, arg)
                    else:
                        log.warning("herald: %s", arg)
            except Exception:
                log.exception("herald callback failed")

    # -- HTTP API --------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers,
                                               timeout=aiohttp.ClientTimeout(total=self._timeout))
        headers = _auth.bearer(await _auth.resolve_async(self._token))
        try:
            async with self._http.request(method, self.url + path, headers=headers or None, **kwargs) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise HeraldError(None, "CONNECTION_FAILED", str(e) or type(e).__name__) from e
        try:
            import json
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        if status >= 400:
            raise HeraldError.from_body(status, body)
        return body

    async def create_session(self, prompts: Iterable[_http.PromptSpec], models: Optional[Iterable[str]] = None,
                             strategy: Optional[str] = None,
                             metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        return await self._request("POST", "/api/wizard/sessions",
                                   json=_http.create_body(prompts, models, strategy, metadata))

    async def get_session(self, session_id: str) -> Dict[str, Any]:
        return await self._request("GET", f"/api/wizard/session/{_http.session_path(session_id)}")

    async def get_events(self, session_id: str, after: int = 0, limit: int = 100) -> Dict[str, Any]:
        return await self._request("GET", f"/api/wizard/session/{_http.session_path(session_id)}/events",
                                   params={"after": after, "limit": limit})

    async def list_sessions(self, status: Optional[str] = None) -> List[Dict[str, Any]]:
        body = await self._request("GET", "/api/wizard/sessions", params={"status": status} if status else None)
        return body["sessions"]

    async def models(self) -> List[Dict[str, Any]]:
        return (await self._request("GET", "/api/models"))["models"]

    async def respond(self, session_id: str, clarification_id: str, answer: str) -> Any:
        return await self._request("POST", "/api/wizard/clarifications/respond",
                                   json={"sessionId": session_id, "clarificationId": clarification_id,
                                         "answer": answer})

    async def cancel(self, session_id: str) -> Dict[str, Any]:
        return await self._request("POST", f"/api/wizard/session/{_http.session_path(session_id)}/cancel")

    async def wait(self) -> None:
        await self._sio.wait()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        try:
            await self._sio.disconnect()
        except Exception:
            pass
        self._queue.put_nowait(None)
        if asyncio.current_task() is not self._dispatcher:
            try:
                await asyncio.wait_for(self._dispatcher, 5)
            except Exception:
                pass
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> "AsyncHeraldClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
