"""Producer idempotency keys: a repeated key is acknowledged but not logged or emitted again."""

from __future__ import annotations

from heraldtest import WAIT, SyncCollector, get_events, post_ok


def item(key, n):
    return {"event": "progress", "data": {"status": "PROCESSING", "progress": n, "n": n}, "idempotencyKey": key}


def test_same_key_twice(base, sid):
    c = SyncCollector().connect(base, ["websocket"])
    try:
        c.first("connected")
        assert c.sio.call("subscribe", sid, timeout=WAIT).get("ok") is True

        first = post_ok(base, sid, item("k-1", 10))
        assert (first["accepted"], first["duplicates"], first["lastSeq"], first["seqs"]) == (1, 0, 1, [1]), first
        second = post_ok(base, sid, item("k-1", 10))
        assert second["accepted"] == 0, second
        assert second["duplicates"] == 1, second
        assert second["lastSeq"] == 1, second
        assert second["seqs"] == [1], second  # the seq it got the first time

        body = get_events(base, sid, 0).json()
        assert [e["seq"] for e in body["events"]] == [1], body
        assert body["lastSeq"] == 1, body

        # a new key goes through; events of a session are ordered, so once seq 2 is
        # here a second copy of seq 1 would already have been seen
        third = post_ok(base, sid, item("k-2", 20))
        assert third["seqs"] == [2] and third["accepted"] == 1 and third["duplicates"] == 0, third
        got = c.wait_session_events(sid, 2, source="wire")
        assert [p["seq"] for _, p in got] == [1, 2], got
        assert [p["n"] for _, p in got] == [10, 20], got
    finally:
        c.disconnect()


def test_duplicate_inside_a_later_batch(base, sid):
    post_ok(base, sid, item("a", 1))
    r = post_ok(base, sid, [item("b", 2), item("a", 1), item("c", 3)])
    assert r["accepted"] == 2 and r["duplicates"] == 1, r
    assert r["seqs"] == [2, 1, 3], r
    assert r["lastSeq"] == 3, r
    body = get_events(base, sid, 0).json()
    assert [(e["seq"], e["data"]["n"]) for e in body["events"]] == [(1, 1), (2, 2), (3, 3)], body


def test_keys_are_per_session(base, sid):
    other = sid + "-other"
    assert post_ok(base, sid, item("shared", 1))["accepted"] == 1
    r = post_ok(base, other, item("shared", 1))
    assert r["accepted"] == 1 and r["duplicates"] == 0 and r["seqs"] == [1], r


def test_no_key_is_never_deduplicated(base, sid):
    plain = {"event": "error", "data": {"error": "same"}}
    post_ok(base, sid, plain)
    r = post_ok(base, sid, plain, query="?reopen=true")
    assert r["accepted"] == 1 and r["duplicates"] == 0 and r["seqs"] == [2], r
