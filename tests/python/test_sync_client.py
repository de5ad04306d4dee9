"""The real synchronous `socketio.Client` (python-socketio 5.x) against herald."""

from __future__ import annotations

import pytest

from heraldtest import (
    NEGATIVE_WAIT,
    SESSION_EVENTS,
    TRANSPORTS,
    TS_RE,
    WAIT,
    SyncCollector,
    assert_session_event,
    new_sid,
    post_ok,
    sample_events,
)



@pytest.fixture(params=list(TRANSPORTS))
def client(request, base):
    transports, expected = TRANSPORTS[request.param]
    c = SyncCollector().connect(base, transports)
    assert c.sio.connected
    assert c.sio.transport() == expected
    yield c
    c.disconnect()


def test_connected_event(client):
    payload = client.first("connected")
    assert isinstance(payload, dict), payload
    assert isinstance(payload.get("socketId"), str) and payload["socketId"], payload
    # socketId is the socket's id, as the client knows it (socket.io-client's socket.id)
    assert payload["socketId"] == client.sio.get_sid("/"), (payload, client.sio.get_sid("/"))
    assert isinstance(payload.get("timestamp"), str) and TS_RE.match(payload["timestamp"]), payload
    # exactly one connected event
    assert [n for n, _ in client.events].count("connected") == 1


def test_subscribe_and_receive_all_five_kinds(client, base, sid):
    client.first("connected")
    ack = client.sio.call("subscribe", {"sessionId": sid, "lastSeq": 0}, timeout=WAIT)
    assert isinstance(ack, dict), ack
    assert ack.get("ok") is True, ack
    assert ack.get("sessionId") == sid, ack
    assert ack.get("lastSeq") == 0, ack
    assert ack.get("epoch") == "", ack  # no events yet
    assert ack.get("recovered") is True, ack  # lastSeq given and nothing missed

    sub = client.first("subscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
    assert sub.get("lastSeq") == 0, sub
    assert sub.get("epoch") == "", sub
    assert sub.get("recovered") is True, sub
    assert isinstance(sub.get("timestamp"), str) and TS_RE.match(sub["timestamp"]), sub

    tag = new_sid("tag")
    items = sample_events(tag)
    # two single posts, then a batch of three
    r1 = post_ok(base, sid, items[0])
    assert r1["accepted"] == 1 and r1["duplicates"] == 0 and r1["lastSeq"] == 1 and r1["seqs"] == [1], r1
    r2 = post_ok(base, sid, items[1])
    assert r2["accepted"] == 1 and r2["lastSeq"] == 2 and r2["seqs"] == [2], r2
    r3 = post_ok(base, sid, items[2:])
    assert r3["accepted"] == 3 and r3["duplicates"] == 0 and r3["lastSeq"] == 5 and r3["seqs"] == [3, 4, 5], r3

    # wire order: exactly seq 1..5, in order, each once
    wire = client.wait_session_events(sid, 5, source="wire")
    assert [p["seq"] for _, p in wire] == [1, 2, 3, 4, 5], wire
    for (name, payload), item, seq in zip(wire, items, range(1, 6)):
        assert_session_event(name, payload, sid, seq, item)

    # and every handler got its event with the same payload
    handled = client.wait_session_events(sid, 5)
    by_seq = {p["seq"]: (n, p) for n, p in handled}
    assert sorted(by_seq) == [1, 2, 3, 4, 5], handled
    for seq, item in zip(range(1, 6), items):
        name, payload = by_seq[seq]
        assert_session_event(name, payload, sid, seq, item)

    # subscribed came before any session event on the wire
    names = [n for n, p in client.wire if n == "subscribed" or (n in SESSION_EVENTS and isinstance(p, dict) and p.get("sessionId") == sid)]
    assert names[0] == "subscribed", client.wire


def test_two_clients_same_session(base, sid):
    """A websocket and a polling client subscribed to one session see the same log."""
    a = SyncCollector().connect(base, ["websocket"])
    b = SyncCollector().connect(base, ["polling"])
    try:
        for c in (a, b):
            c.first("connected")
            ack = c.sio.call("subscribe", sid, timeout=WAIT)
            assert ack.get("ok") is True and ack.get("sessionId") == sid, ack
        items = sample_events("two")
        post_ok(base, sid, items)
        for c in (a, b):
            got = c.wait_session_events(sid, 5, source="wire")
            assert [(n, p["seq"]) for n, p in got] == [(it["event"], i) for i, it in enumerate(items, 1)], got
    finally:
        a.disconnect()
        b.disconnect()


def test_unsubscribe_stops_delivery(client, base, sid):
    other = new_sid()
    client.first("connected")
    assert client.sio.call("subscribe", sid, timeout=WAIT)["ok"] is True
    assert client.sio.call("subscribe", other, timeout=WAIT)["ok"] is True
    post_ok(base, sid, sample_events("u")[0])
    client.wait_session_events(sid, 1, source="wire")

    ack = client.sio.call("unsubscribe", sid, timeout=WAIT)
    assert ack.get("ok") is True and ack.get("sessionId") == sid, ack
    uns = client.first("unsubscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
    assert isinstance(uns.get("timestamp"), str) and TS_RE.match(uns["timestamp"]), uns

    post_ok(base, sid, sample_events("u")[1])  # seq 2, must not arrive
    post_ok(base, other, sample_events("u")[1])  # fence on a still-subscribed session
    client.wait_session_events(other, 1, source="wire")
    # bounded negative wait on top of the fence
    with client.cond:
        client.cond.wait_for(lambda: len(client._session_events_nolock(sid, "wire")) > 1, NEGATIVE_WAIT)
    assert [p["seq"] for _, p in client.session_events(sid, "wire")] == [1], client.wire


def test_unsubscribe_not_subscribed_is_not_an_error(client, sid):
    client.first("connected")
    ack = client.sio.call("unsubscribe", sid, timeout=WAIT)
    assert ack.get("ok") is True and ack.get("sessionId") == sid, ack
    client.first("unsubscribed", lambda p: isinstance(p, dict) and p.get("sessionId") == sid)
    assert not [p for n, p in client.events if n == "error"], client.events
