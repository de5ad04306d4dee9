"""Existing Socket.IO workers publish through Redis with the real python-socketio
`RedisManager(write_only=True)` / `AsyncRedisManager`, unchanged (SPEC §6): two real herald
nodes log each emit once, a python-socketio client on either node receives it, and what is
no session event is counted and described in the ingest errors stream."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import redis
import requests
import socketio

from heraldtest import NEGATIVE_WAIT, WAIT, SyncCollector, new_sid

LEASE_MS = 1500
NODE_RE = re.compile(r"cluster mode.*?node=\"?([\w.:-]+)")


def node_id(server) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        found = NODE_RE.search(server.stderr_tail(400))
        if found:
            return found.group(1)
        assert time.monotonic() < deadline, "the node never logged its id"
        time.sleep(0.05)


def wait_until(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(herald_factory, redis_url):
    prefix = "py-" + new_sid("emit")
    nodes = [
        herald_factory("--redis-url", redis_url, "--redis-prefix", prefix, "--cluster-lease-ms", str(LEASE_MS))
        for _ in range(2)
    ]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    # Once the lease is taken its holder has subscribed: emits from here on are heard.
    wait_until(lambda: r.get(f"{prefix}:emitters:lease") is not None, "a translator")
    return prefix, nodes, r


def history(base: str, sid: str) -> list[dict]:
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 0, "limit": 1000}, timeout=WAIT)
    return r.json()["events"] if r.status_code == 200 else []


def errors(r: redis.Redis, prefix: str) -> list[dict]:
    return [fields for _, fields in r.xrange(f"{prefix}:ingest:errors")]


def refused_total(nodes) -> int:
    total = 0
    for node in nodes:
        text = requests.get(f"{node.url}/metrics", timeout=WAIT).text
        found = re.search(r"^herald_emitter_refused_total (\d+)$", text, re.M)
        assert found, text
        total += int(found.group(1))
    return total


def progress(step: int) -> dict:
    return {"status": "PROCESSING", "progress": step * 20, "currentStep": f"page {step}"}


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_redis_manager_emits_are_logged_once_and_reach_a_client_on_either_node(cluster, redis_url, transport):
    _, (a, b), _ = cluster
    sid = new_sid("job")
    watcher = SyncCollector().connect(b.url, [transport])
    try:
        ack = watcher.sio.call("subscribe", {"sessionId": sid}, timeout=WAIT)
        assert ack.get("ok") is True, ack
        worker = socketio.RedisManager(redis_url, write_only=True)
        for step in range(1, 5):
            worker.emit("progress", progress(step), room=sid)

        async def finish():
            async_worker = socketio.AsyncRedisManager(redis_url, write_only=True)
            await async_worker.emit("completed", {"result": {"pages": 4}}, room=sid)

        asyncio.run(finish())
        got = watcher.wait_session_events(sid, 5, source="wire")
        assert [p["seq"] for _, p in got] == [1, 2, 3, 4, 5], got
        assert [n for n, _ in got] == ["progress"] * 4 + ["completed"]
        assert [p["progress"] for _, p in got[:4]] == [20, 40, 60, 80]
        assert got[4][1]["result"] == {"pages": 4}
        time.sleep(NEGATIVE_WAIT)  # bounded negative check: a second translator would have logged twice by now
        logged = history(a.url, sid)
        assert [e["seq"] for e in logged] == [1, 2, 3, 4, 5], logged
        assert history(b.url, sid) == logged
        assert len(watcher.session_events(sid, source="wire")) == 5
    finally:
        watcher.disconnect()


def test_messages_that_are_no_session_event_are_counted_and_described(cluster, redis_url):
    prefix, nodes, r = cluster
    sid = new_sid("odd")
    before_errors = len(errors(r, prefix))
    before_refused = refused_total(nodes)
    worker = socketio.RedisManager(redis_url, write_only=True)
    worker.emit("progress", progress(1))  # to every socket: names no session
    worker.emit("progress", progress(1), room=sid, namespace="/chat")
    worker.enter_room("some-sid", "/", sid)  # a room change: no session event
    worker.emit("bogus", {"x": 1}, room=sid)  # an emit, but of no session event
    worker.emit("progress", {"progress": 5}, room=sid)  # no status
    wait_until(lambda: len(errors(r, prefix)) >= before_errors + 5, "five refusals")
    described = errors(r, prefix)[before_errors:]
    assert all(e["entry"] == "pubsub:socketio" for e in described), described
    assert [e["code"] for e in described] == ["INVALID_ENTRY"] * 3 + ["INVALID_EVENT"] * 2, described
    reasons = " | ".join(e["error"] for e in described[:3])
    assert "no room" in reasons and "namespace" in reasons and "`enter_room`" in reasons, reasons
    assert "bogus" in described[3]["error"] and "status" in described[4]["error"], described
    # Counted once, by the one translator.
    assert refused_total(nodes) == before_refused + 5
    assert history(nodes[0].url, sid) == []


def test_the_translation_moves_to_the_other_node_when_its_holder_is_killed(cluster, redis_url):
    prefix, (a, b), r = cluster
    ids = {node_id(a): a, node_id(b): b}
    holder = ids[r.get(f"{prefix}:emitters:lease")]
    other = b if holder is a else a
    other_id = node_id(other)
    holder.checked = True  # killed, not stopped: no exit status to check
    holder.proc.kill()
    holder.proc.wait()
    # The lease runs out, and the survivor takes it at its next renewal (a third of a lease).
    wait_until(lambda: r.get(f"{prefix}:emitters:lease") == other_id, "the survivor to take over", LEASE_MS / 1000 * 3)
    sid = new_sid("moved")
    socketio.RedisManager(redis_url, write_only=True).emit("progress", progress(1), room=sid)
    wait_until(lambda: len(history(other.url, sid)) == 1, "the emit to be logged by the survivor")
