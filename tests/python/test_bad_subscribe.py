"""Bad `subscribe` input: ok:false ack + `error` event, socket stays connected and usable."""

from __future__ import annotations

import asyncio

import pytest

from heraldtest import (
    TS_RE,
    WAIT,
    AsyncCollector,
    SyncCollector,
    new_sid,
    post_ok,
    sample_events,
)

ID = "INVALID_SESSION_ID"
PAYLOAD = "INVALID_PAYLOAD"
EITHER = {ID, PAYLOAD}

BAD = [
    pytest.param("", {ID}, id="empty-string"),
    pytest.param("x" * 129, {ID}, id="129-chars"),
    pytest.param("bad id!", {ID}, id="space-and-bang"),
    pytest.param("-leading-dash", {ID}, id="leading-dash"),
    pytest.param(123, EITHER, id="number"),
    pytest.param({}, EITHER, id="empty-object"),
    pytest.param(None, EITHER, id="no-argument"),
    pytest.param(["s1"], EITHER, id="array"),
    pytest.param({"sessionId": ""}, {ID}, id="object-empty-id"),
    pytest.param({"sessionId": "x" * 129}, {ID}, id="object-129-chars"),
    pytest.param({"sessionId": 5}, EITHER, id="object-id-number"),
    pytest.param({"sessionId": "ok-id", "lastSeq": "abc"}, {PAYLOAD}, id="lastSeq-string"),
    pytest.param({"sessionId": "ok-id", "lastSeq": -1}, {PAYLOAD}, id="lastSeq-negative"),
]


def check_error(ack, err_event, codes):
    assert isinstance(ack, dict), ack
    assert ack.get("ok") is False, ack
    err = ack.get("error")
    assert isinstance(err, dict), ack
    assert err.get("code") in codes, ack
    assert isinstance(err.get("message"), str) and err["message"], ack
    assert isinstance(err_event, dict), err_event
    assert err_event.get("code") == err["code"], (err_event, ack)
    assert isinstance(err_event.get("error"), str) and err_event["error"], err_event
    assert isinstance(err_event.get("timestamp"), str) and TS_RE.match(err_event["timestamp"]), err_event
    assert "seq" not in err_event, err_event  # protocol errors are not session events


@pytest.fixture(scope="module")
def shared_client(base):
    """One socket that takes every bad input in turn: it must survive all of them."""
    c = SyncCollector().connect(base, ["websocket"])
    c.first("connected")
    yield c
    c.disconnect()


@pytest.mark.parametrize("payload,codes", BAD)
def test_bad_subscribe_sync(shared_client, base, payload, codes):
    c = shared_client
    n_errors = len([1 for n, _ in c.events if n == "error"])
    ack = c.sio.call("subscribe", payload, timeout=WAIT)
    c.wait_for(lambda: len([1 for n, _ in c.events if n == "error"]) > n_errors, what="error event")
    err_event = [p for n, p in c.events if n == "error"][n_errors]
    check_error(ack, err_event, codes)
    assert c.sio.connected
    assert not c.disconnected.is_set()

    # the same socket still works
    sid = new_sid()
    ok = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
    assert ok.get("ok") is True and ok.get("sessionId") == sid, ok
    post_ok(base, sid, sample_events("after-bad")[0])
    got = c.wait_session_events(sid, 1, source="wire")
    assert got[0][0] == "progress" and got[0][1]["seq"] == 1, got


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_bad_subscribe_without_ack_gets_error_event(base, transport):
    c = SyncCollector().connect(base, [transport])
    try:
        c.first("connected")
        c.sio.emit("subscribe", "bad id!")  # no ack callback
        ev = c.first("error")
        assert ev.get("code") == ID, ev
        assert TS_RE.match(ev.get("timestamp", "")), ev
        assert "seq" not in ev, ev
        assert c.sio.connected
        sid = new_sid()
        assert c.sio.call("subscribe", sid, timeout=WAIT).get("ok") is True
    finally:
        c.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_bad_subscribe_async(base, transport):
    async def main():
        c = AsyncCollector()
        await c.connect(base, [transport])
        try:
            for i, (payload, codes) in enumerate([("", {ID}), ("x" * 129, {ID}), ("bad id!", {ID}), (123, EITHER), ({}, EITHER)]):
                ack = await c.sio.call("subscribe", payload, timeout=WAIT)
                await c.wait_for(lambda: len([1 for n, _ in c.events if n == "error"]) > i, what="error event")
                err_event = [p for n, p in c.events if n == "error"][i]
                check_error(ack, err_event, codes)
                assert c.sio.connected
            sid = new_sid()
            ack = await c.sio.call("subscribe", sid, timeout=WAIT)
            assert ack.get("ok") is True and ack.get("sessionId") == sid, ack
            await asyncio.to_thread(post_ok, base, sid, sample_events("a")[4])
            got = await c.wait_session_events(sid, 1)
            assert got[0][0] == "error" and got[0][1]["seq"] == 1 and got[0][1]["error"] == "model exploded", got
        finally:
            await c.disconnect()

    asyncio.run(main())
