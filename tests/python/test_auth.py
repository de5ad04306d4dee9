"""Auth (SPEC §5) as the real python-socketio clients see it, over websocket and polling.

herald runs with `--jwt-secret` (HS256 tokens minted here by `mint_token`) and API keys.
What a python-socketio user sees of a refused handshake: `connect()` raises
`socketio.exceptions.ConnectionError("One or more namespaces failed to connect: /")`,
which does not carry herald's message; the message (`"TOKEN_EXPIRED: ..."`) reaches the
client's `connect_error` handler, as `{"message": ...}`. Both are asserted.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
import requests
import socketio

from heraldtest import (
    WAIT,
    AsyncCollector,
    SyncCollector,
    assert_error,
    bearer,
    mint_token,
    new_sid,
    post_events,
    post_ok,
)

SECRET = "py-auth-test-secret-0123456789abcdef"
PUBLISH_KEY = "py-publish-key-3f9a"
ADMIN_KEY = "py-admin-key-77c1"
READ_KEY = "py-read-key-12ab"
API_KEYS = f"py-publisher:{PUBLISH_KEY}:publish,py-ops:{ADMIN_KEY}:admin,py-reader:{READ_KEY}:read"
PUBLISH = bearer(PUBLISH_KEY)

TRANSPORTS = ["websocket", "polling"]
SERVER_DISCONNECT = socketio.Client.reason.SERVER_DISCONNECT



@pytest.fixture(scope="module")
def server(herald_factory):
    """Auth on: HS256 tokens (no leeway, so expiry is exact) and three API keys."""
    return herald_factory(
        "--jwt-secret", SECRET, "--jwt-leeway-secs", "0", env={"HERALD_API_KEYS": API_KEYS}
    )


@pytest.fixture(scope="module")
def aud_server(herald_factory):
    """The same, but tokens must name the audience `herald`."""
    return herald_factory("--jwt-secret", SECRET, "--jwt-leeway-secs", "0", "--jwt-audience", "herald")


def progress(n: int) -> dict:
    return {"event": "progress", "data": {"status": "PROCESSING", "progress": n}}


def unix(ts: str) -> float:
    """herald's `2026-01-02T03:04:05.678Z` as a Unix time."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------
# refused handshakes
# --------------------------------------------------------------------------

# which server, what the client presents (connect() keyword arguments), the code herald's
# refusal must start with
REFUSED = [
    pytest.param("server", lambda: {}, "UNAUTHORIZED", id="no-token"),
    pytest.param("server", lambda: {"auth": {"token": "not-a-credential"}}, "UNAUTHORIZED", id="unknown-credential"),
    pytest.param("server", lambda: {"auth": {"token": "abc.def.ghi"}}, "INVALID_TOKEN", id="malformed-jwt"),
    pytest.param(
        "server", lambda: {"auth": {"token": mint_token("another-secret", sessions=["*"])}}, "INVALID_TOKEN",
        id="wrong-signature",
    ),
    pytest.param(
        "server", lambda: {"auth": {"token": mint_token(SECRET, exp=int(time.time()) - 5)}}, "TOKEN_EXPIRED",
        id="expired",
    ),
    pytest.param(
        "server", lambda: {"headers": bearer(mint_token(SECRET, exp=int(time.time()) - 5))}, "TOKEN_EXPIRED",
        id="expired-bearer-header",
    ),
    pytest.param(
        "aud_server", lambda: {"auth": {"token": mint_token(SECRET, aud="another-service")}}, "INVALID_TOKEN",
        id="wrong-audience",
    ),
    pytest.param(
        "aud_server", lambda: {"auth": {"token": mint_token(SECRET)}}, "INVALID_TOKEN", id="no-audience",
    ),
]


class Seen:
    """What a user's code observes of one connect attempt."""

    def __init__(self, events, error, connected):
        self.events = events
        self.error = error
        self.connected = connected

    def connect_errors(self):
        return [p for n, p in self.events if n == "connect_error"]


def connect_sync(url, transport, **kw) -> Seen:
    c = SyncCollector()
    error = None
    try:
        c.connect(url, [transport], **kw)
    except socketio.exceptions.ConnectionError as e:
        error = e
    seen = Seen(list(c.events), error, c.sio.connected)
    c.disconnect()
    return seen


def connect_async(url, transport, **kw) -> Seen:
    async def main():
        c = AsyncCollector()
        error = None
        try:
            await c.connect(url, [transport], **kw)
        except socketio.exceptions.ConnectionError as e:
            error = e
        seen = Seen(list(c.events), error, c.sio.connected)
        await c.disconnect()
        return seen

    return asyncio.run(main())


CONNECT = {"sync": connect_sync, "async": connect_async}


def assert_refused(seen: Seen, *codes: str):
    """Refused, and herald's message, as the `connect_error` handler gets it, starts with
    one of `codes` (then `: ` and the reason)."""
    code = "|".join(codes)
    assert isinstance(seen.error, socketio.exceptions.ConnectionError), (
        f"connect() should raise ConnectionError for a {code} refusal; events={seen.events!r}"
    )
    assert not seen.connected
    assert not [n for n, _ in seen.events if n in ("connect", "connected")], seen.events
    errors = seen.connect_errors()
    assert len(errors) == 1, f"expected one connect_error, got {seen.events!r}"
    data = errors[0]
    assert isinstance(data, dict) and isinstance(data.get("message"), str), f"connect_error data: {data!r}"
    message = data["message"]
    prefix = next((f"{c}: " for c in codes if message.startswith(f"{c}: ")), None)
    assert prefix, f"connect_error message should start with '{code}: ': {message!r}"
    assert len(message) > len(prefix) + 8, f"the refusal should say why: {message!r}"


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("which,credentials,code", REFUSED)
def test_refused_handshake(request, kind, transport, which, credentials, code):
    srv = request.getfixturevalue(which)
    seen = CONNECT[kind](srv.url, transport, **credentials())
    assert_refused(seen, code)
    if which == "aud_server" and code == "INVALID_TOKEN":
        assert "audience" in seen.connect_errors()[0]["message"], seen.connect_errors()


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_accepted_handshakes(server, aud_server, kind, transport):
    """Every way python-socketio can present a credential is accepted, on the same servers
    that refuse the cases above (so those refusals are about the credential)."""
    token = mint_token(SECRET, sessions=["*"])
    ways = {
        "auth": (server.url, {"auth": {"token": token}}),
        "auth-callable": (server.url, {"auth": lambda: {"token": token}}),
        "authorization-header": (server.url, {"headers": bearer(token)}),
        "x-api-key-header": (server.url, {"headers": {"X-Api-Key": READ_KEY}}),
        "query": (f"{server.url}?token={token}", {}),
        "audience": (aud_server.url, {"auth": {"token": mint_token(SECRET, aud="herald")}}),
    }
    for way, (url, kw) in ways.items():
        seen = CONNECT[kind](url, transport, **kw)
        assert seen.error is None, f"{way}: connect raised {seen.error!r}; events={seen.events!r}"
        assert seen.connected, f"{way}: not connected; events={seen.events!r}"
        assert not seen.connect_errors(), f"{way}: {seen.events!r}"


def test_publish_only_key_cannot_connect(server):
    assert_refused(connect_sync(server.url, "websocket", auth={"token": PUBLISH_KEY}), "FORBIDDEN")


# --------------------------------------------------------------------------
# a forbidden subscribe
# --------------------------------------------------------------------------


def assert_forbidden(ack, event, sid):
    assert isinstance(ack, dict) and ack.get("ok") is False, f"subscribe {sid}: expected a failing ack, got {ack!r}"
    assert isinstance(ack.get("error"), dict) and ack["error"].get("code") == "FORBIDDEN", ack
    assert isinstance(ack["error"].get("message"), str) and ack["error"]["message"], ack
    assert isinstance(event, dict) and event.get("code") == "FORBIDDEN", event
    assert event.get("sessionId") == sid, event
    assert isinstance(event.get("error"), str) and event["error"], event
    assert "seq" not in event, event


def is_error_for(sid):
    return lambda p: isinstance(p, dict) and p.get("sessionId") == sid


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forbidden_subscribe_sync(server, transport):
    allowed, other = new_sid("allowed"), new_sid("other")
    token = mint_token(SECRET, sessions=["allowed-*"])
    c = SyncCollector().connect(server.url, [transport], auth={"token": token})
    try:
        ack = c.sio.call("subscribe", {"sessionId": other, "lastSeq": 0}, timeout=WAIT)
        assert_forbidden(ack, c.first("error", is_error_for(other)), other)
        assert c.sio.connected and not c.disconnected.is_set(), "a forbidden subscribe must not drop the socket"

        ack = c.sio.call("subscribe", {"sessionId": allowed, "lastSeq": 0}, timeout=WAIT)
        assert ack.get("ok") is True and ack.get("sessionId") == allowed, ack
        post_ok(server.url, other, [progress(1)], headers=PUBLISH)
        post_ok(server.url, allowed, [progress(1), progress(2), progress(3)], headers=PUBLISH)
        got = c.wait_session_events(allowed, 3, source="wire")
        assert [p["seq"] for _, p in got] == [1, 2, 3], got
        assert not c.session_events(other, source="wire"), "events of a forbidden session reached the socket"
        assert c.sio.connected
    finally:
        c.disconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forbidden_subscribe_async(server, transport):
    allowed, other = new_sid("allowed"), new_sid("other")
    token = mint_token(SECRET, sessions=["allowed-*"])

    async def main():
        c = await AsyncCollector().connect(server.url, [transport], auth={"token": token})
        try:
            ack = await c.sio.call("subscribe", other, timeout=WAIT)
            assert_forbidden(ack, await c.first("error", is_error_for(other)), other)
            assert c.sio.connected, "a forbidden subscribe must not drop the socket"

            ack = await c.sio.call("subscribe", allowed, timeout=WAIT)
            assert ack.get("ok") is True and ack.get("sessionId") == allowed, ack
            await asyncio.to_thread(post_ok, server.url, other, [progress(1)], PUBLISH)
            await asyncio.to_thread(post_ok, server.url, allowed, [progress(1), progress(2)], PUBLISH)
            got = await c.wait_session_events(allowed, 2)
            assert [p["seq"] for _, p in got] == [1, 2], got
            assert not c.session_events(other), "events of a forbidden session reached the socket"
            assert c.sio.connected and not c.disconnect_reasons, c.disconnect_reasons
        finally:
            await c.disconnect()

    asyncio.run(main())


# --------------------------------------------------------------------------
# a token that expires on a live socket; reconnecting with a fresh one
# --------------------------------------------------------------------------


class Tokens:
    """An `auth` callable: a token that expires in ~2 s first, then fresh ones."""

    def __init__(self):
        self.calls = 0
        self.first_exp = int(time.time()) + 2

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            return {"token": mint_token(SECRET, exp=self.first_exp, sessions=["allowed-*"])}
        return {"token": mint_token(SECRET, ttl=60, sessions=["allowed-*"])}


def assert_expired_event(event, exp):
    assert event.get("code") == "TOKEN_EXPIRED", event
    assert isinstance(event.get("error"), str) and event["error"], event
    assert "seq" not in event and "sessionId" not in event, f"not a session event: {event!r}"
    sent = unix(event["timestamp"])
    assert sent >= exp - 0.01, f"herald expired the socket {exp - sent:.3f}s before the token's exp"
    assert sent <= exp + 3, f"herald expired the socket {sent - exp:.3f}s after the token's exp"


def engineio_closed(sio) -> bool:
    """python-socketio calls the `disconnect` handler before its Engine.IO client has shut
    down; connect() raises ValueError until it has."""
    return sio.eio.state == "disconnected"


def wait_engineio_closed(sio):
    deadline = time.monotonic() + WAIT
    while not engineio_closed(sio):  # bounded: nothing signals this state change
        assert time.monotonic() < deadline, f"Engine.IO still {sio.eio.state!r} {WAIT}s after the disconnect"
        time.sleep(0.01)


async def await_engineio_closed(sio):
    deadline = time.monotonic() + WAIT
    while not engineio_closed(sio):
        assert time.monotonic() < deadline, f"Engine.IO still {sio.eio.state!r} {WAIT}s after the disconnect"
        await asyncio.sleep(0.01)


def is_expiry(p):
    return isinstance(p, dict) and p.get("code") == "TOKEN_EXPIRED"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_expiry_sync(server, transport):
    sid = new_sid("allowed")
    tokens = Tokens()
    c = SyncCollector().connect(server.url, [transport], auth=tokens)
    try:
        assert c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT).get("ok") is True
        post_ok(server.url, sid, progress(1), headers=PUBLISH)
        c.wait_session_events(sid, 1)

        assert_expired_event(c.first("error", is_expiry, timeout=WAIT + 2), tokens.first_exp)
        assert c.disconnected.wait(WAIT), f"not disconnected after TOKEN_EXPIRED; events={c.events!r}"
        assert c.disconnect_reasons == [SERVER_DISCONNECT], c.disconnect_reasons
        assert not c.sio.connected

        # connecting again calls the `auth` callable again: a fresh token, and the gap replays
        post_ok(server.url, sid, progress(2), headers=PUBLISH)
        wait_engineio_closed(c.sio)
        c.connect(server.url, [transport], auth=tokens)
        assert tokens.calls == 2
        ack = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 1}, timeout=WAIT)
        assert ack.get("ok") is True and ack.get("recovered") is True, ack
        got = c.wait_session_events(sid, 2, source="wire")
        assert [p["seq"] for _, p in got] == [1, 2], got
    finally:
        c.disconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_expiry_async(server, transport):
    sid = new_sid("allowed")
    tokens = Tokens()

    async def main():
        c = await AsyncCollector().connect(server.url, [transport], auth=tokens)
        try:
            assert (await c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)).get("ok") is True
            await asyncio.to_thread(post_ok, server.url, sid, progress(1), PUBLISH)
            await c.wait_session_events(sid, 1)

            assert_expired_event(await c.first("error", is_expiry, timeout=WAIT + 2), tokens.first_exp)
            await c.wait_for(lambda: c.disconnect_reasons, what="disconnect after TOKEN_EXPIRED")
            assert c.disconnect_reasons == [SERVER_DISCONNECT], c.disconnect_reasons
            assert not c.sio.connected

            await asyncio.to_thread(post_ok, server.url, sid, progress(2), PUBLISH)
            await await_engineio_closed(c.sio)
            await c.connect(server.url, [transport], auth=tokens)
            assert tokens.calls == 2
            ack = await c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 1}, timeout=WAIT)
            assert ack.get("ok") is True and ack.get("recovered") is True, ack
            got = await c.wait_session_events(sid, 2)
            assert [p["seq"] for _, p in got] == [1, 2], got
        finally:
            await c.disconnect()

    asyncio.run(main())


# --------------------------------------------------------------------------
# `auth` as a callable: python-socketio's own reconnects present a fresh token
# --------------------------------------------------------------------------


class Rotating:
    """An `auth` callable whose first token covers `first-*` and later ones `second-*`, so
    which token a connection was made with shows in what it may subscribe to."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        pattern = "first-*" if self.calls == 1 else "second-*"
        return {"token": mint_token(SECRET, sub=f"rotating-{self.calls}", sessions=[pattern])}


RECONNECTING = {"reconnection": True, "reconnection_delay": 0.1, "reconnection_delay_max": 0.5,
                "randomization_factor": 0}


def drop_sockets(base, sid):
    r = requests.post(f"{base}/api/dev/session/{sid}/drop-sockets", headers=bearer(ADMIN_KEY), timeout=WAIT)
    assert r.status_code == 200 and r.json().get("dropped", 0) >= 1, f"drop-sockets: {r.status_code} {r.text}"


def connects(c):
    return len([1 for n, _ in c.events if n == "connect"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auth_callable_on_reconnect_sync(server, transport):
    first, second = new_sid("first"), new_sid("second")
    auth = Rotating()
    c = SyncCollector(**RECONNECTING).connect(server.url, [transport], auth=auth)
    try:
        assert auth.calls == 1
        assert c.sio.call("subscribe", first, timeout=WAIT).get("ok") is True
        assert_forbidden(c.sio.call("subscribe", second, timeout=WAIT), c.first("error", is_error_for(second)), second)

        drop_sockets(server.url, first)  # a network-like drop: python-socketio reconnects by itself
        c.wait_for(lambda: connects(c) >= 2, what="python-socketio's own reconnect")
        assert auth.calls == 2, f"the reconnect should have called `auth` again (calls={auth.calls})"
        ack = c.sio.call("subscribe", {"sessionId": second, "lastSeq": 0}, timeout=WAIT)
        assert ack.get("ok") is True, f"the reconnect did not use the fresh token: {ack!r}"
        assert c.sio.call("subscribe", first, timeout=WAIT).get("ok") is False
        post_ok(server.url, second, progress(1), headers=PUBLISH)
        got = c.wait_session_events(second, 1, source="wire")
        assert got[0][1]["seq"] == 1, got
    finally:
        c.disconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auth_callable_on_reconnect_async(server, transport):
    first, second = new_sid("first"), new_sid("second")
    auth = Rotating()

    async def async_auth():  # python-socketio's AsyncClient awaits coroutine functions
        await asyncio.sleep(0)
        return auth()

    async def main():
        c = await AsyncCollector(**RECONNECTING).connect(server.url, [transport], auth=async_auth)
        try:
            assert auth.calls == 1
            assert (await c.sio.call("subscribe", first, timeout=WAIT)).get("ok") is True
            assert (await c.sio.call("subscribe", second, timeout=WAIT)).get("ok") is False

            await asyncio.to_thread(drop_sockets, server.url, first)
            await c.wait_for(lambda: connects(c) >= 2, what="python-socketio's own reconnect")
            assert auth.calls == 2, f"the reconnect should have called `auth` again (calls={auth.calls})"
            ack = await c.sio.call("subscribe", {"sessionId": second, "lastSeq": 0}, timeout=WAIT)
            assert ack.get("ok") is True, f"the reconnect did not use the fresh token: {ack!r}"
            await asyncio.to_thread(post_ok, server.url, second, progress(1), PUBLISH)
            got = await c.wait_session_events(second, 1)
            assert got[0][1]["seq"] == 1, got
        finally:
            await c.disconnect()

    asyncio.run(main())


# --------------------------------------------------------------------------
# HTTP with the same credentials
# --------------------------------------------------------------------------


def test_http_credentials(server):
    sid = new_sid("allowed")
    r = post_events(server.url, sid, progress(1))
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
    post_ok(server.url, sid, progress(1), headers={"X-Api-Key": PUBLISH_KEY})

    reader = bearer(mint_token(SECRET, sessions=["allowed-*"]))
    r = requests.get(f"{server.url}/api/wizard/session/{sid}", headers=reader, timeout=WAIT)
    assert r.status_code == 200 and r.json()["lastSeq"] == 1, r.text
    r = requests.get(f"{server.url}/api/wizard/session/{new_sid('other')}", headers=reader, timeout=WAIT)
    assert_error(r, 403, "FORBIDDEN")
    r = requests.get(f"{server.url}/api/wizard/session/{sid}", params={"token": mint_token("x")}, timeout=WAIT)
    assert_error(r, 401, "INVALID_TOKEN")
    # a reader may not publish
    assert_error(post_events(server.url, sid, progress(2), headers=reader), 403, "FORBIDDEN")


# --------------------------------------------------------------------------
# ownership, as a python-socketio user and their HTTP calls see it
# --------------------------------------------------------------------------

CREATOR_SCOPE = "read answer cancel create"


def session_ids(base: str, headers: dict) -> list[str]:
    r = requests.get(f"{base}/api/wizard/sessions", headers=headers, timeout=WAIT)
    assert r.status_code == 200, r.text
    return [s["sessionId"] for s in r.json()["sessions"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_alices_session_is_invisible_to_bob(server, transport):
    alice = mint_token(SECRET, sub=new_sid("alice"), scope=CREATOR_SCOPE)
    bob = mint_token(SECRET, sub=new_sid("bob"), scope=CREATOR_SCOPE)
    r = requests.post(
        f"{server.url}/api/wizard/sessions",
        json={"prompts": ["Plan the trip [clarify]"], "models": ["sim-fast"]},
        headers=bearer(alice),
        timeout=WAIT,
    )
    assert r.status_code == 201, r.text
    sid = r.json()["sessionId"]
    owner = SyncCollector().connect(server.url, [transport], auth={"token": alice})
    intruder = SyncCollector().connect(server.url, [transport], auth={"token": bob})
    try:
        ack = owner.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
        assert ack.get("ok") is True, ack
        question = owner.first("clarification", lambda p: p.get("sessionId") == sid and p.get("status") == "pending")

        # Bob's socket: refused, still connected, and never sent an event of hers.
        ack = intruder.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
        assert_forbidden(ack, intruder.first("error", is_error_for(sid)), sid)
        assert intruder.sio.connected and not intruder.disconnected.is_set()

        # Bob's HTTP calls: not listed, and 403 on everything else.
        assert sid in session_ids(server.url, bearer(alice))
        assert sid not in session_ids(server.url, bearer(bob))
        answer = {"sessionId": sid, "clarificationId": question["clarificationId"], "answer": "Lisbon"}
        for r in (
            requests.get(f"{server.url}/api/wizard/session/{sid}", headers=bearer(bob), timeout=WAIT),
            requests.get(f"{server.url}/api/wizard/session/{sid}/events", headers=bearer(bob), timeout=WAIT),
            requests.post(f"{server.url}/api/wizard/clarifications/respond", json=answer, headers=bearer(bob), timeout=WAIT),
            requests.post(f"{server.url}/api/wizard/session/{sid}/cancel", json={}, headers=bearer(bob), timeout=WAIT),
        ):
            assert_error(r, 403, "FORBIDDEN")

        # Alice answers; her socket sees the run go on and end, Bob's sees nothing of it.
        r = requests.post(f"{server.url}/api/wizard/clarifications/respond", json=answer, headers=bearer(alice), timeout=WAIT)
        assert r.status_code == 200, r.text
        owner.first("completed", lambda p: p.get("sessionId") == sid)
        assert not intruder.session_events(sid, source="wire"), "Bob's socket received Alice's events"
    finally:
        owner.disconnect()
        intruder.disconnect()


# --------------------------------------------------------------------------
# API key scopes, and the origin check, with the real clients
# --------------------------------------------------------------------------


def test_api_key_scopes_on_ingest_and_metrics(server):
    sid = new_sid("allowed")
    assert_error(post_events(server.url, sid, progress(1), headers={"X-Api-Key": READ_KEY}), 403, "FORBIDDEN")
    post_ok(server.url, sid, progress(1), headers={"X-Api-Key": PUBLISH_KEY})
    for key in (PUBLISH_KEY, READ_KEY):
        assert_error(requests.get(f"{server.url}/metrics", headers=bearer(key), timeout=WAIT), 403, "FORBIDDEN")
    assert_error(requests.get(f"{server.url}/metrics", timeout=WAIT), 401, "UNAUTHORIZED")
    r = requests.get(f"{server.url}/metrics", headers=bearer(ADMIN_KEY), timeout=WAIT)
    assert r.status_code == 200 and "herald_events_logged_total" in r.text, r.text[:200]
    # A reader key is a back-end subscriber: it may connect and follow.
    c = SyncCollector().connect(server.url, ["websocket"], auth={"token": READ_KEY})
    try:
        ack = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
        assert ack.get("ok") is True, ack
        assert [p["seq"] for _, p in c.wait_session_events(sid, 1, source="wire")] == [1]
    finally:
        c.disconnect()


@pytest.fixture(scope="module")
def origin_server(herald_factory):
    """Auth on and one allowed origin (not --dev, which allows any)."""
    return herald_factory(
        "--jwt-secret", SECRET, "--cors-origins", "https://app.example.com", dev=False,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_page_from_another_origin_cannot_connect(origin_server, transport):
    token = mint_token(SECRET, sessions=["*"])
    refused = connect_sync(
        origin_server.url, transport, auth={"token": token}, headers={"Origin": "https://evil.example"}
    )
    assert refused.error is not None and not refused.connected, refused.events
    assert not [n for n, _ in refused.events if n in ("connect", "connected")], refused.events
    allowed = connect_sync(
        origin_server.url, transport, auth={"token": token}, headers={"Origin": "https://app.example.com"}
    )
    assert allowed.error is None and allowed.connected, allowed.events
