"""Replay on subscribe with lastSeq (and epoch), with the real python-socketio clients."""

from __future__ import annotations

import asyncio

import pytest
import requests

from heraldtest import (
    TS_RE,
    WAIT,
    AsyncCollector,
    SyncCollector,
    assert_session_event,
    get_events,
    post_ok,
)


def five_plus_one(tag):
    """Six distinguishable progress/model_result items."""
    items = []
    for i in range(1, 7):
        if i % 2:
            items.append({"event": "progress", "data": {"status": "PROCESSING", "progress": i * 10, "n": i, "tag": tag}})
        else:
            items.append(
                {
                    "event": "model_result",
                    "data": {"promptId": f"p{i}", "modelName": "m", "status": "processing", "result": f"r{i}", "n": i, "tag": tag},
                }
            )
    return items


def epoch_of(base, sid):
    r = get_events(base, sid, 0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body.get("epoch"), str) and body["epoch"], body
    assert body.get("lastSeq") == 5, body
    return body["epoch"]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_sync_replay_after_lastseq_then_live(base, sid, transport):
    items = five_plus_one(sid)
    r = post_ok(base, sid, items[:5])
    assert r["seqs"] == [1, 2, 3, 4, 5], r
    epoch = epoch_of(base, sid)

    c = SyncCollector().connect(base, [transport])
    try:
        c.first("connected")
        ack = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 2}, timeout=WAIT)
        assert ack.get("ok") is True and ack.get("sessionId") == sid, ack
        assert ack.get("recovered") is True, ack
        assert ack.get("lastSeq") == 5, ack  # head of the log
        assert ack.get("epoch") == epoch, ack

        sub = c.first("subscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
        assert sub.get("recovered") is True, sub
        assert sub.get("lastSeq") == 5 and sub.get("epoch") == epoch, sub
        assert TS_RE.match(sub.get("timestamp", "")), sub

        replay = c.wait_session_events(sid, 3, source="wire")
        assert [p["seq"] for _, p in replay] == [3, 4, 5], replay

        r = post_ok(base, sid, items[5])
        assert r["seqs"] == [6], r
        got = c.wait_session_events(sid, 4, source="wire")
        assert [p["seq"] for _, p in got] == [3, 4, 5, 6], got
        for (name, payload), seq in zip(got, [3, 4, 5, 6]):
            assert_session_event(name, payload, sid, seq, items[seq - 1])

        # on the wire: subscribed, then the replay, then live
        rel = [(n, p.get("seq")) for n, p in c.wire if isinstance(p, dict) and p.get("sessionId") == sid]
        assert rel[0][0] == "subscribed", rel
        assert [s for _, s in rel[1:]] == [3, 4, 5, 6], rel
    finally:
        c.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_async_replay_with_matching_epoch(base, sid, transport):
    items = five_plus_one(sid)
    post_ok(base, sid, items[:5])
    epoch = epoch_of(base, sid)

    async def main():
        c = AsyncCollector()
        await c.connect(base, [transport])
        try:
            ack = await c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 2, "epoch": epoch}, timeout=WAIT)
            assert ack.get("ok") is True and ack.get("recovered") is True, ack
            got = await c.wait_session_events(sid, 3)
            assert [p["seq"] for _, p in got] == [3, 4, 5], got
            await asyncio.to_thread(post_ok, base, sid, items[5])
            got = await c.wait_session_events(sid, 4)
            assert [p["seq"] for _, p in got] == [3, 4, 5, 6], got
            for (name, payload), seq in zip(got, [3, 4, 5, 6]):
                assert_session_event(name, payload, sid, seq, items[seq - 1])
            rel = [n for n, p in c.events if isinstance(p, dict) and p.get("sessionId") == sid]
            assert rel[0] == "subscribed", c.events
        finally:
            await c.disconnect()

    asyncio.run(main())


def test_replay_with_stale_epoch_is_not_recovered(base, sid):
    """An epoch naming another incarnation: recovered false, no replay, live events still flow."""
    items = five_plus_one(sid)
    post_ok(base, sid, items[:5])
    epoch = epoch_of(base, sid)
    stale = "stale-" + epoch

    c = SyncCollector().connect(base, ["websocket"])
    try:
        c.first("connected")
        ack = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 2, "epoch": stale}, timeout=WAIT)
        assert ack.get("ok") is True, ack
        assert ack.get("recovered") is False, ack
        sub = c.first("subscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
        assert sub.get("recovered") is False, sub
        assert sub.get("lastSeq") == 5 and sub.get("epoch") == epoch, sub
        post_ok(base, sid, items[5])
        # events of one session are ordered: had a replay been sent it would precede seq 6
        got = c.wait_session_events(sid, 1, source="wire")
        assert [p["seq"] for _, p in got] == [6], got
    finally:
        c.disconnect()


def test_replay_from_zero_gets_everything(base, sid):
    items = five_plus_one(sid)
    post_ok(base, sid, items[:5])
    c = SyncCollector().connect(base, ["websocket"])
    try:
        c.first("connected")
        ack = c.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
        assert ack.get("ok") is True and ack.get("recovered") is True and ack.get("lastSeq") == 5, ack
        got = c.wait_session_events(sid, 5, source="wire")
        assert [p["seq"] for _, p in got] == [1, 2, 3, 4, 5], got
        # the HTTP log agrees with what the socket saw
        body = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 0}, timeout=WAIT).json()
        assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4, 5], body
        assert [e["event"] for e in body["events"]] == [it["event"] for it in items[:5]], body
        for e, (_, p) in zip(body["events"], got):
            assert e["data"]["n"] == p["n"] and e["data"]["tag"] == p["tag"], (e, p)
    finally:
        c.disconnect()
