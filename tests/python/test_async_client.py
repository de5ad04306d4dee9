"""The real `socketio.AsyncClient` (python-socketio 5.x, asyncio) against herald."""

from __future__ import annotations

import asyncio

import pytest

from heraldtest import (
    TRANSPORTS,
    TS_RE,
    WAIT,
    AsyncCollector,
    assert_session_event,
    new_sid,
    post_ok,
    sample_events,
)



async def apost(base, sid, body, query=""):
    return await asyncio.to_thread(post_ok, base, sid, body, None, query)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_async_string_subscribe_and_five_kinds(base, transport):
    transports, expected = TRANSPORTS[transport]
    sid = new_sid()

    async def main():
        c = AsyncCollector()
        await c.connect(base, transports)
        try:
            assert c.sio.connected
            assert c.sio.transport() == expected
            # subscribe straight after connect() returns, as user code does
            ack = await c.sio.call("subscribe", sid, timeout=WAIT)
            assert isinstance(ack, dict), ack
            assert ack.get("ok") is True, ack
            assert ack.get("sessionId") == sid, ack
            assert ack.get("lastSeq") == 0, ack
            assert ack.get("epoch") == "", ack
            assert "recovered" not in ack, ack  # only present when lastSeq was given

            conn = await c.first("connected")
            assert conn.get("socketId") == c.sio.get_sid("/"), conn
            assert isinstance(conn.get("timestamp"), str) and TS_RE.match(conn["timestamp"]), conn

            sub = await c.first("subscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
            assert sub.get("lastSeq") == 0 and sub.get("epoch") == "", sub
            assert "recovered" not in sub, sub
            assert isinstance(sub.get("timestamp"), str) and TS_RE.match(sub["timestamp"]), sub

            tag = new_sid("atag")
            items = sample_events(tag)
            r = await apost(base, sid, items[:3])
            assert r["accepted"] == 3 and r["seqs"] == [1, 2, 3] and r["lastSeq"] == 3, r
            for i, item in enumerate(items[3:], start=4):
                # the error after completed reopens the ended session
                r = await apost(base, sid, item, "?reopen=true")
                assert r["seqs"] == [i] and r["lastSeq"] == i, r

            got = await c.wait_session_events(sid, 5)
            assert [p["seq"] for _, p in got] == [1, 2, 3, 4, 5], got
            for (name, payload), item, seq in zip(got, items, range(1, 6)):
                assert_session_event(name, payload, sid, seq, item)

            # subscribed precedes the session's events
            order = [n for n, p in c.events if isinstance(p, dict) and p.get("sessionId") == sid]
            assert order[0] == "subscribed", c.events
        finally:
            await c.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_async_many_sessions_one_socket(base, transport):
    """One socket subscribed to three sessions gets each session's events, in order, once."""
    sids = [new_sid() for _ in range(3)]

    async def main():
        c = AsyncCollector()
        await c.connect(base, TRANSPORTS[transport][0])
        try:
            acks = await asyncio.gather(*(c.sio.call("subscribe", {"sessionId": s}, timeout=WAIT) for s in sids))
            for s, ack in zip(sids, acks):
                assert ack.get("ok") is True and ack.get("sessionId") == s, ack
            items = sample_events("many")
            await asyncio.gather(*(apost(base, s, items) for s in sids))
            for s in sids:
                got = await c.wait_session_events(s, 5)
                assert [(n, p["seq"]) for n, p in got] == [(it["event"], i) for i, it in enumerate(items, 1)], got
        finally:
            await c.disconnect()

    asyncio.run(main())
