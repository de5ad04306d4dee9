"""Credentials: token= (a string or a callable), typed HeraldAuthError, and reconnecting
with a fresh token after herald expires a live socket, against the real herald binary."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid

import pytest
import requests

from herald_client import (AsyncHeraldClient, HeraldAuthError, HeraldClient, HeraldError, HeraldPublisher,
                           Progress)
from helpers import until, wait_until

SECRET = "herald-client-auth-test-secret-0123"
PUBLISH_KEY = "hc-publish-key-8e1f"
ADMIN_KEY = "hc-admin-key-2b7d"
TRANSPORTS = ["websocket", "polling"]


def mint(sub: str = "alice", ttl: float = 60, exp: int = None, secret: str = SECRET, **claims) -> str:
    """An HS256 JWT herald (`--jwt-secret SECRET`) accepts."""
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": int(now + ttl) if exp is None else exp, **claims}
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def url(herald_server_factory) -> str:
    # leeway 0: a token expires exactly at its exp. A short ping interval bounds how long a
    # refused polling handshake can keep python-socketio's connect() waiting (see
    # tests/python/test_auth.py).
    return herald_server_factory("--jwt-secret", SECRET, "--jwt-leeway-secs", "0", "--ping-interval-ms", "1000",
                                 "--api-keys", f"publisher:{PUBLISH_KEY}:publish,ops:{ADMIN_KEY}:admin").url


@pytest.fixture
def sid() -> str:
    return f"team-{uuid.uuid4().hex[:12]}"


class Tokens:
    """A token callable: the first token expires in about 2 s, later ones in a minute."""

    def __init__(self, **claims):
        self.claims = {"sessions": ["team-*"], **claims}
        self.calls = 0
        self.first_exp = int(time.time()) + 2
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            self.calls += 1
            if self.calls == 1:
                return mint(exp=self.first_exp, **self.claims)
            return mint(ttl=60, **self.claims)


class Producer:
    """Posts a progress event every 20 ms (with the publish API key) until stopped."""

    def __init__(self, base: str, sid: str):
        self.pub = HeraldPublisher(base, api_key=PUBLISH_KEY)
        self.sid = sid
        self.posted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.pub.progress(self.sid, status="PROCESSING", progress=min(self.posted, 100), n=self.posted)
            self.posted += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.posted


def assert_contiguous(seqs, what):
    assert seqs == list(range(1, len(seqs) + 1)), f"{what}: seqs not 1..n exactly once: {seqs}"


# --------------------------------------------------------------------------------------
# refresh after expiry, gap-free
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_callable_refreshes_after_expiry_without_gaps(url, sid, transport):
    tokens = Tokens()
    auth_errors, events = [], []
    with HeraldClient(url, token=tokens, transports=[transport], reconnection_delay=0.05,
                      on_auth_error=auth_errors.append) as client:
        client.subscribe(sid, events.append)
        first_sid = client._sio.sid
        producer = Producer(url, sid)
        try:
            wait_until(lambda: auth_errors, timeout=6, what="TOKEN_EXPIRED from herald")
            err = auth_errors[0]
            assert isinstance(err, HeraldAuthError) and err.code == "TOKEN_EXPIRED" and err.status is None, err
            assert time.time() >= tokens.first_exp - 0.05, "expired before the token's exp"
            wait_until(lambda: client.connected and client._sio.sid not in (None, first_sid)
                       and not client.subscriptions[sid].awaiting, timeout=10, what="reconnected with a fresh token")
            assert tokens.calls >= 2
            seen = len(events)
            wait_until(lambda: len(events) >= seen + 5, what="live events after the refresh")
        finally:
            posted = producer.stop()
        head = history_as(url, sid)[-1]["seq"]
        assert head == posted
        wait_until(lambda: events and events[-1].seq == head, what="every event")
    assert_contiguous([e.seq for e in events], "across the token refresh")
    assert all(isinstance(e, Progress) for e in events)
    assert [e.code for e in auth_errors] == ["TOKEN_EXPIRED"], auth_errors


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_token_coroutine_refreshes_after_expiry_without_gaps(url, sid, transport):
    tokens = Tokens()

    async def token():  # a coroutine function is awaited on every (re)connect and HTTP call
        await asyncio.sleep(0)
        return tokens()

    async def main():
        auth_errors, events = [], []
        async with AsyncHeraldClient(url, token=token, transports=[transport], reconnection_delay=0.05,
                                     on_auth_error=auth_errors.append) as client:
            await client.subscribe(sid, events.append)
            first_sid = client._sio.sid
            producer = Producer(url, sid)
            try:
                await until(lambda: auth_errors, timeout=6, what="TOKEN_EXPIRED from herald")
                assert isinstance(auth_errors[0], HeraldAuthError) and auth_errors[0].code == "TOKEN_EXPIRED"
                await until(lambda: client.connected and client._sio.sid not in (None, first_sid)
                            and not client.subscriptions[sid].awaiting, timeout=10, what="reconnected")
                seen = len(events)
                await until(lambda: len(events) >= seen + 5, what="live events after the refresh")
                snapshot = await client.get_session(sid)  # HTTP with a token from the coroutine
                assert snapshot["sessionId"] == sid
            finally:
                posted = await asyncio.to_thread(producer.stop)
            await until(lambda: events and events[-1].seq == posted, what="every event")
            return events, auth_errors

    events, auth_errors = asyncio.run(main())
    assert tokens.calls >= 3  # connect, reconnect, get_session
    assert_contiguous([e.seq for e in events], "across the token refresh")
    assert [e.code for e in auth_errors] == ["TOKEN_EXPIRED"], auth_errors


def test_static_token_is_not_retried_after_expiry(url, sid):
    token = mint(exp=int(time.time()) + 2, sessions=["team-*"])
    auth_errors = []
    with HeraldClient(url, token=token, transports=["websocket"], reconnection_delay=0.05,
                      on_auth_error=auth_errors.append) as client:
        client.subscribe(sid)
        wait_until(lambda: auth_errors and not client.connected, timeout=6, what="expiry and disconnect")
        time.sleep(0.5)  # bounded negative wait: no reconnect attempt (it would be refused, and reported)
        assert not client.connected
        assert [e.code for e in auth_errors] == ["TOKEN_EXPIRED"], auth_errors


# --------------------------------------------------------------------------------------
# typed errors
# --------------------------------------------------------------------------------------

REFUSED = [
    pytest.param(None, "UNAUTHORIZED", id="no-token"),
    pytest.param("not-a-credential", "UNAUTHORIZED", id="unknown-credential"),
    pytest.param("abc.def.ghi", "INVALID_TOKEN", id="malformed"),
    pytest.param(mint(secret="another-secret", sessions=["*"]), "INVALID_TOKEN", id="wrong-signature"),
    pytest.param(mint(exp=int(time.time()) - 5), "TOKEN_EXPIRED", id="expired"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("token,code", REFUSED)
def test_refused_connect_is_a_typed_error(url, sid, transport, token, code):
    with HeraldClient(url, token=token, transports=[transport]) as client:
        with pytest.raises(HeraldAuthError) as e:
            client.subscribe(sid)
        assert e.value.code == code and e.value.status is None, e.value
        assert isinstance(e.value, HeraldError) and e.value.message, e.value
        assert sid not in client.subscriptions  # a failed subscribe() leaves nothing behind
        with pytest.raises(HeraldAuthError) as e:
            client.get_session(sid)
        assert e.value.status == 401 and e.value.code == code, e.value


def test_async_refused_connect_is_a_typed_error(url, sid):
    async def main():
        async with AsyncHeraldClient(url, token="abc.def.ghi", transports=["polling"]) as client:
            with pytest.raises(HeraldAuthError) as e:
                await client.subscribe(sid)
            assert e.value.code == "INVALID_TOKEN"
            with pytest.raises(HeraldAuthError) as e:
                await client.list_sessions()
            assert (e.value.status, e.value.code) == (401, "INVALID_TOKEN")

    asyncio.run(main())


def test_forbidden_subscribe_and_http_are_typed_errors(url, sid):
    other = f"other-{uuid.uuid4().hex[:8]}"
    HeraldPublisher(url, api_key=PUBLISH_KEY).progress(other, status="PROCESSING", progress=1)
    protocol_errors = []
    with HeraldClient(url, token=mint(sessions=["team-*"]), on_protocol_error=protocol_errors.append) as client:
        with pytest.raises(HeraldAuthError) as e:
            client.subscribe(other)
        assert (e.value.code, e.value.status) == ("FORBIDDEN", None), e.value
        assert client.connected  # herald keeps the socket
        client.subscribe(sid)  # the allowed session works on the same socket
        with pytest.raises(HeraldAuthError) as e:
            client.get_session(other)
        assert (e.value.status, e.value.code) == (403, "FORBIDDEN")
        with pytest.raises(HeraldError) as e:
            client.get_session(sid)  # covered but not created: not an auth error
        assert not isinstance(e.value, HeraldAuthError) and e.value.code == "SESSION_NOT_FOUND"
        wait_until(lambda: protocol_errors, what="the FORBIDDEN error event")
        assert protocol_errors[0]["code"] == "FORBIDDEN" and protocol_errors[0]["sessionId"] == other


def test_token_callable_failure_is_raised(url, sid):
    def token():
        raise RuntimeError("the token service is down")

    with HeraldClient(url, token=token) as client:
        with pytest.raises(RuntimeError, match="token service"):
            client.subscribe(sid)
        with pytest.raises(RuntimeError, match="token service"):
            client.get_session(sid)
    with pytest.raises(TypeError, match="non-empty str"):
        HeraldClient(url, token=lambda: None).get_session(sid)
    with pytest.raises(ValueError):
        HeraldClient(url, token="a", api_key="b")


def test_resubscribe_refused_by_a_fresh_token_is_reported(url):
    """After a reconnect the new token no longer covers one of the sessions: its
    re-subscribe is refused, and on_auth_error says which."""
    kept, lost = f"team-{uuid.uuid4().hex[:8]}", f"team-{uuid.uuid4().hex[:8]}"
    calls = []

    def token():
        calls.append(1)
        return mint(sessions=[kept, lost] if len(calls) == 1 else [kept])

    auth_errors = []
    with HeraldClient(url, token=token, reconnection_delay=0.05, on_auth_error=auth_errors.append) as client:
        client.subscribe(kept)
        client.subscribe(lost)
        r = requests.post(f"{url}/api/dev/session/{kept}/drop-sockets", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          timeout=5)
        assert r.status_code == 200 and r.json()["dropped"] >= 1, r.text
        wait_until(lambda: auth_errors, what="the refused re-subscribe")
        assert auth_errors[0].code == "FORBIDDEN" and lost in auth_errors[0].message, auth_errors
        assert set(client.subscriptions) == {kept}
        assert not client.subscriptions[kept].awaiting


# --------------------------------------------------------------------------------------
# HTTP calls carry the token
# --------------------------------------------------------------------------------------


def test_http_calls_send_the_token(url):
    calls = []

    def token():
        calls.append(1)
        return mint(sub="carol", scope="read create answer cancel")  # no `sessions`: only what carol owns

    with HeraldClient(url, token=token) as client:
        snap = client.create_session(["What is a monad?"], models=["sim-fast"])
        sid = snap["sessionId"]
        assert client.get_session(sid)["sessionId"] == sid
        assert client.get_events(sid)["sessionId"] == sid
        assert sid in [s["sessionId"] for s in client.list_sessions()]
        assert client.models()
        client.cancel(sid)
        assert len(calls) == 6, f"the token callable should run before each HTTP call, ran {len(calls)} times"
    # someone else's token sees nothing of carol's session
    with HeraldClient(url, token=mint(sub="dave")) as other:
        assert sid not in [s["sessionId"] for s in other.list_sessions()]
        with pytest.raises(HeraldAuthError) as e:
            other.get_session(sid)
        assert e.value.status == 403
    with pytest.raises(HeraldAuthError) as e:
        HeraldClient(url).get_session(sid)
    assert (e.value.status, e.value.code) == (401, "UNAUTHORIZED")


def test_publisher_credentials(url, sid):
    assert HeraldPublisher(url, api_key=PUBLISH_KEY).progress(sid, status="ACTIVE", progress=0)["seqs"] == [1]
    token = mint(sub="worker", scope="publish", sessions=["team-*"])
    assert HeraldPublisher(url, token=token).progress(sid, status="PROCESSING", progress=5)["seqs"] == [2]
    calls = []
    assert HeraldPublisher(url, token=lambda: calls.append(1) or token).completed(sid, {"ok": 1})["seqs"] == [3]
    assert calls == [1]
    for pub, status, code in [
        (HeraldPublisher(url, retries=3, backoff=5), 401, "UNAUTHORIZED"),  # backoff 5: a retry would show
        (HeraldPublisher(url, token=mint(scope="publish", sessions=["elsewhere-*"]), backoff=5), 403, "FORBIDDEN"),
        (HeraldPublisher(url, token=mint(exp=int(time.time()) - 5, scope="publish"), backoff=5), 401,
         "TOKEN_EXPIRED"),
    ]:
        started = time.monotonic()
        with pytest.raises(HeraldAuthError) as e:
            pub.progress(sid, status="PROCESSING", progress=9)
        assert (e.value.status, e.value.code) == (status, code)
        assert time.monotonic() - started < 4, "a refused credential must not be retried"
    assert [e["seq"] for e in history_as(url, sid)] == [1, 2, 3]


def history_as(base: str, sid: str):
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 0, "limit": 1000},
                     headers={"Authorization": f"Bearer {mint(sessions=['*'])}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["events"]


