"""Helpers shared by the python-socketio compatibility tests.

Start/stop the real herald binary, collect what a real `python-socketio` client
receives, and talk to the HTTP API. Nothing here sleeps to synchronise: every
wait is on a threading/asyncio primitive with a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import requests
import socketio

REPO = Path(__file__).resolve().parents[2]
HERALD_BIN = os.environ.get("HERALD_BIN") or str(REPO / "target" / "debug" / "herald")

LISTEN_RE = re.compile(r"listening on http://([^:\s]+):(\d+)")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

SESSION_EVENTS = ("progress", "model_result", "clarification", "completed", "error")
SERVER_EVENTS = ("connected", "subscribed", "unsubscribed") + SESSION_EVENTS

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
WAIT = 5.0  # default timeout for anything that must arrive
NEGATIVE_WAIT = 0.5  # bounded wait for "must not arrive" checks


def new_sid(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------
# server process
# --------------------------------------------------------------------------


class HeraldServer:
    """One `herald serve` child process on an ephemeral loopback port."""

    def __init__(self, extra_args=(), log_path: Path | None = None, env=None, dev: bool = True):
        self.extra_args = list(extra_args)
        self.dev = dev
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.host = None
        self.port = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HeraldServer":
        if not os.path.isfile(HERALD_BIN) or not os.access(HERALD_BIN, os.X_OK):
            raise RuntimeError(
                f"herald binary not found at {HERALD_BIN}: run `cargo build` or set HERALD_BIN"
            )
        dev = ["--dev"] if self.dev else []
        args = [HERALD_BIN, "serve", "--host", "127.0.0.1", "--port", "0", *dev, *self.extra_args]
        env = dict(os.environ)
        # a stray HERALD_* from the caller's shell must not change the server under test
        for k in list(env):
            if k.startswith("HERALD_"):
                del env[k]
        env.setdefault("RUST_LOG", "info")
        if self.env:
            env.update(self.env)
        if self.log_path is not None:
            self._log_file = open(self.log_path, "wb")
            stderr = self._log_file
        else:
            stderr = subprocess.DEVNULL
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"herald exited with {self.proc.returncode} before listening; "
                    f"stdout={self.stdout_lines!r}; stderr tail:\n{self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(
                    f"herald did not print 'herald listening on http://HOST:PORT' within "
                    f"{START_TIMEOUT}s; stdout={self.stdout_lines!r}"
                )
        return self

    def _pump_stdout(self):
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.stdout_lines.append(line)
            if not self._ready.is_set():
                m = LISTEN_RE.search(line)
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    self._ready.set()

    def stderr_tail(self, n: int = 40) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return "<stderr not captured>"
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._close()
                return None
        self._close()
        return self.proc.returncode

    def _close(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop_and_check(self):
        """SIGTERM; assert a graceful exit with status 0."""
        self.checked = True
        rc = self.terminate()
        assert rc is not None, (
            f"herald did not exit within {STOP_TIMEOUT}s of SIGTERM (killed); stderr tail:\n"
            f"{self.stderr_tail()}"
        )
        assert rc == 0, f"herald exited with {rc} after SIGTERM; stderr tail:\n{self.stderr_tail()}"


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


def post_events(base: str, sid: str, body, timeout: float = WAIT, headers=None, query: str = "") -> requests.Response:
    """``query`` (e.g. ``"?reopen=true"``) is appended to the URL: a session whose log holds
    a completed or error event takes more producer events only with reopen."""
    # serialise by hand: requests' json=None would send no body at all
    return requests.post(
        f"{base}/api/sessions/{sid}/events{query}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=timeout,
    )


def post_ok(base: str, sid: str, body, headers=None, query: str = "") -> dict:
    r = post_events(base, sid, body, headers=headers, query=query)
    assert r.status_code == 202, f"POST events {body!r} -> {r.status_code} {r.text}"
    return r.json()


def get_events(base: str, sid: str, after: int = 0) -> requests.Response:
    return requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": after}, timeout=WAIT)


def assert_error(r: requests.Response, status: int, code=None):
    """`code` may be a string or a set of acceptable strings (None: any string)."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {r.status_code} {r.text!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"bad error shape: {body!r}"
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], f"error.code missing: {body!r}"
    assert isinstance(err.get("message"), str) and err["message"], f"error.message missing: {body!r}"
    if code is not None:
        codes = {code} if isinstance(code, str) else set(code)
        assert err["code"] in codes, f"error.code {err['code']!r} not in {sorted(codes)}: {body!r}"
    return err


def sample_events(tag: str) -> list[dict]:
    """One valid ingest item of each of the five kinds, each with extra producer fields."""
    return [
        {
            "event": "progress",
            "data": {
                "status": "PROCESSING",
                "progress": 12.5,
                "prompts": {"total": 2, "completed": 0, "processing": 1, "pending": 1, "failed": 0},
                "hasClarifications": False,
                "clarificationCount": 0,
                "producerTag": tag,
                "extra": {"nested": [1, 2, {"k": "v"}], "none": None},
            },
        },
        {
            "event": "model_result",
            "data": {
                "promptId": "p1",
                "modelName": "llama3.1:8b",
                "provider": "simulated",
                "duration": 42,
                "result": "partial out",
                "status": "processing",
                "producerTag": tag,
            },
        },
        {
            "event": "clarification",
            "data": {
                "clarificationId": str(uuid.uuid4()),
                "question": "Which year?",
                "status": "pending",
                "producerTag": tag,
            },
        },
        {
            "event": "completed",
            "data": {"result": {"answer": 42, "perPrompt": [{"p1": "x"}]}, "producerTag": tag},
        },
        {
            "event": "error",
            "data": {"error": "model exploded", "code": "MODEL_FAILED", "producerTag": tag},
        },
    ]


def assert_session_event(name: str, payload, sid: str, seq: int, item: dict):
    """A received session event matches what was posted, plus sessionId/seq/timestamp."""
    assert item["event"] == name, f"expected {item['event']!r}, got {name!r}: {payload!r}"
    assert isinstance(payload, dict), f"{name} payload is not an object: {payload!r}"
    assert payload.get("sessionId") == sid, payload
    assert payload.get("seq") == seq, f"expected seq {seq}: {payload!r}"
    ts = payload.get("timestamp")
    assert isinstance(ts, str) and TS_RE.match(ts), f"bad timestamp {ts!r} in {payload!r}"
    for k, v in item["data"].items():
        if k in ("timestamp",):
            continue
        assert k in payload, f"field {k!r} dropped from {name}: {payload!r}"
        assert payload[k] == v, f"field {k!r}: sent {v!r}, got {payload[k]!r}"


# --------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret: str, sub: str = "py-tester", ttl: float = 60, exp: int | None = None, **claims) -> str:
    """An HS256 JWT as herald (`--jwt-secret SECRET`) verifies it: `sub`, `exp` (now + ttl
    unless given, whole seconds), `iat`, plus any claims (`sessions`, `scope`, `aud`...)."""
    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": int(now + ttl) if exp is None else exp, **claims}
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(body).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def bearer(credential: str) -> dict:
    return {"Authorization": f"Bearer {credential}"}


# --------------------------------------------------------------------------
# socket.io collectors
# --------------------------------------------------------------------------

_PACKET_RE = re.compile(r"^2(?:/[^,\[]*,)?(\d*)(\[.*)$", re.S)


def _parse_event_packet(data):
    """Parse an Engine.IO MESSAGE that carries a Socket.IO EVENT; return (name, args) or None."""
    if not isinstance(data, str):
        return None
    m = _PACKET_RE.match(data)
    if not m:
        return None
    try:
        arr = json.loads(m.group(2))
    except ValueError:
        return None
    if not arr or not isinstance(arr[0], str):
        return None
    return arr[0], arr[1:]


class SyncCollector:
    """A real `socketio.Client` plus everything it received.

    python-socketio's sync client runs each handler in its own thread, so handler
    call order is not wire order. `wire` records the events in the order the
    client read them off the transport (a tap on the Engine.IO packet reader,
    which runs sequentially); `events` records what the handlers were given.
    """

    def __init__(self, **client_kwargs):
        client_kwargs.setdefault("reconnection", False)
        self.sio = socketio.Client(**client_kwargs)
        self.cond = threading.Condition()
        self.events: list[tuple[str, object]] = []
        self.wire: list[tuple[str, object]] = []
        self.disconnected = threading.Event()
        self.disconnect_reasons: list[object] = []
        for name in SERVER_EVENTS + ("connect", "connect_error"):
            self.sio.on(name, self._make_handler(name))
        self.sio.on("disconnect", self._on_disconnect)
        eio = self.sio.eio
        orig = eio._receive_packet

        def tap(pkt, _orig=orig):
            if pkt.packet_type == 4:  # Engine.IO MESSAGE
                parsed = _parse_event_packet(pkt.data)
                if parsed is not None:
                    name, args = parsed
                    with self.cond:
                        self.wire.append((name, args[0] if len(args) == 1 else args))
                        self.cond.notify_all()
            return _orig(pkt)

        eio._receive_packet = tap

    def _on_disconnect(self, reason=None):
        with self.cond:
            self.disconnect_reasons.append(reason)
            self.disconnected.set()
            self.cond.notify_all()

    def _make_handler(self, name):
        def handler(*args):
            payload = args[0] if len(args) == 1 else list(args)
            with self.cond:
                self.events.append((name, payload))
                self.cond.notify_all()

        return handler

    def connect(self, url, transports, **kw):
        kw.setdefault("wait_timeout", WAIT)
        self.sio.connect(url, transports=transports, **kw)
        return self

    def disconnect(self):
        # python-engineio's polling write loop drops the CLOSE packet when disconnect()
        # lands while a POST is in flight; the client then waits for the server's next
        # ping (25 s) to finish. Wait for the send queue to drain first (client-side race).
        eio = self.sio.eio
        q = getattr(eio, "queue", None)
        if eio.current_transport == "polling" and q is not None:
            with q.all_tasks_done:
                q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, WAIT)
        try:
            self.sio.disconnect()
        except Exception:
            pass

    def wait_for(self, pred, timeout=WAIT, what="condition"):
        with self.cond:
            ok = self.cond.wait_for(pred, timeout)
        assert ok, f"timed out after {timeout}s waiting for {what}; handler events={self.events!r}; wire={self.wire!r}"

    def first(self, name, pred=lambda p: True, timeout=WAIT):
        """Wait for (and return) the first handler-delivered `name` event matching pred."""
        found = []

        def check():
            for n, p in self.events:
                if n == name and pred(p):
                    found.append(p)
                    return True
            return False

        self.wait_for(check, timeout, what=f"event {name!r}")
        return found[0]

    def session_events(self, sid, source="events"):
        lst = self.events if source == "events" else self.wire
        with self.cond:
            return [
                (n, p)
                for n, p in lst
                if n in SESSION_EVENTS and isinstance(p, dict) and p.get("sessionId") == sid and "seq" in p
            ]

    def wait_session_events(self, sid, count, timeout=WAIT, source="events"):
        self.wait_for(
            lambda: len(self._session_events_nolock(sid, source)) >= count,
            timeout,
            what=f"{count} session events for {sid} ({source})",
        )
        return self.session_events(sid, source)

    def _session_events_nolock(self, sid, source):
        lst = self.events if source == "events" else self.wire
        return [
            (n, p)
            for n, p in lst
            if n in SESSION_EVENTS and isinstance(p, dict) and p.get("sessionId") == sid and "seq" in p
        ]


class AsyncCollector:
    """A real `socketio.AsyncClient` plus everything it received, in arrival order.

    The asyncio client schedules one task per incoming message in read order, and
    our handlers are plain functions with no await, so `events` is wire order.
    """

    def __init__(self, **client_kwargs):
        client_kwargs.setdefault("reconnection", False)
        self.sio = socketio.AsyncClient(**client_kwargs)
        self.events: list[tuple[str, object]] = []
        self.disconnect_reasons: list[object] = []
        self._changed = asyncio.Event()
        for name in SERVER_EVENTS + ("connect", "connect_error"):
            self.sio.on(name, self._make_handler(name))
        self.sio.on("disconnect", self._on_disconnect)

    def _make_handler(self, name):
        def handler(*args):
            payload = args[0] if len(args) == 1 else list(args)
            self.events.append((name, payload))
            self._changed.set()

        return handler

    def _on_disconnect(self, reason=None):
        self.disconnect_reasons.append(reason)
        self._changed.set()

    async def connect(self, url, transports, **kw):
        kw.setdefault("wait_timeout", WAIT)
        await self.sio.connect(url, transports=transports, **kw)
        return self

    async def disconnect(self):
        eio = self.sio.eio
        q = getattr(eio, "queue", None)
        if eio.current_transport == "polling" and q is not None:  # see SyncCollector.disconnect
            try:
                await asyncio.wait_for(q.join(), WAIT)
            except asyncio.TimeoutError:
                pass
        try:
            await self.sio.disconnect()
        except Exception:
            pass

    async def wait_for(self, pred, timeout=WAIT, what="condition"):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; events={self.events!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def first(self, name, pred=lambda p: True, timeout=WAIT):
        found = []

        def check():
            for n, p in self.events:
                if n == name and pred(p):
                    found.append(p)
                    return True
            return False

        await self.wait_for(check, timeout, what=f"event {name!r}")
        return found[0]

    def session_events(self, sid):
        return [
            (n, p)
            for n, p in self.events
            if n in SESSION_EVENTS and isinstance(p, dict) and p.get("sessionId") == sid and "seq" in p
        ]

    async def wait_session_events(self, sid, count, timeout=WAIT):
        await self.wait_for(
            lambda: len(self.session_events(sid)) >= count, timeout, what=f"{count} session events for {sid}"
        )
        return self.session_events(sid)

# transport name -> (python-socketio `transports` argument, transport in use once connected).
# None = python-socketio's default: connect with polling, then upgrade to websocket.
TRANSPORTS = {
    "websocket": (["websocket"], "websocket"),
    "polling": (["polling"], "polling"),
    "upgrade": (None, "websocket"),
}
