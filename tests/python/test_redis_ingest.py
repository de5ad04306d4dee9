"""Workers publish through Redis (clients/python's RedisPublisher); two real herald nodes
consume the ingest stream and each event enters the session's log exactly once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from heraldtest import WAIT, new_sid

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))
from herald_client import RedisPublisher  # noqa: E402


@pytest.fixture(scope="module")
def nodes(herald_factory, redis_url):
    prefix = "py-" + new_sid("ingest")
    return prefix, [herald_factory("--redis-url", redis_url, "--redis-prefix", prefix) for _ in range(2)]


def history(base: str, sid: str) -> list[dict]:
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 0, "limit": 1000}, timeout=WAIT)
    return r.json()["events"] if r.status_code == 200 else []


def wait_for_history(base: str, sid: str, count: int) -> list[dict]:
    """Bounded poll of the HTTP history until it holds `count` events."""
    deadline = time.monotonic() + WAIT
    while True:
        events = history(base, sid)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_each_published_event_enters_the_log_once_however_many_nodes_run(nodes, redis_url):
    prefix, (a, b) = nodes
    sid = new_sid("job")
    with RedisPublisher(redis_url, prefix=prefix) as pub:
        for page in range(1, 6):
            data = {"status": "PROCESSING", "progress": page * 10, "page": page}
            key = pub.publish(sid, "progress", data, idempotency_key=f"ocr:{sid}:page-{page}")
            # A worker retrying after a timeout publishes the same event again.
            pub.publish(sid, "progress", data, idempotency_key=key)
        pub.publish_batch(
            sid,
            [
                {"event": "model_result", "data": {"promptId": "p1", "modelName": "ocr", "status": "completed", "result": "text"}},
                {"event": "completed", "data": {"result": {"pages": 5}}, "idempotencyKey": f"ocr:{sid}:done"},
            ],
        )
        pub.publish(sid, "completed", {"result": {"pages": 5}}, idempotency_key=f"ocr:{sid}:done")
    events = wait_for_history(a.url, sid, 7)
    assert [e["seq"] for e in events] == list(range(1, 8)), events
    assert [e["data"].get("page") for e in events[:5]] == [1, 2, 3, 4, 5]
    assert [e["event"] for e in events[5:]] == ["model_result", "completed"]
    # Nothing more arrives, and the other node sees the same log.
    time.sleep(0.5)  # bounded negative check: duplicates would have been logged by now
    assert history(b.url, sid) == history(a.url, sid)
    snapshot = requests.get(f"{b.url}/api/wizard/session/{sid}", timeout=WAIT).json()
    assert snapshot["status"] == "COMPLETED" and snapshot["lastSeq"] == 7


def test_refused_entries_are_described_and_log_nothing(nodes, redis_url):
    prefix, (a, _) = nodes
    sid = new_sid("bad")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    before = client.xlen(f"{prefix}:ingest:errors")
    client.xadd(f"{prefix}:ingest", {"payload": '{"sessionId": "%s", "event": "progress", "data": {"progress": 5}}' % sid})
    client.xadd(f"{prefix}:ingest", {"payload": "not json"})
    deadline = time.monotonic() + WAIT
    while client.xlen(f"{prefix}:ingest:errors") < before + 2:
        assert time.monotonic() < deadline, "refusals were not recorded"
        time.sleep(0.05)
    reasons = [fields["error"] for _, fields in client.xrange(f"{prefix}:ingest:errors")][-2:]
    assert "status" in reasons[0] and "required" in reasons[0], reasons
    assert "invalid payload" in reasons[1], reasons
    assert history(a.url, sid) == []
    with pytest.raises(ValueError):
        RedisPublisher(redis_url, prefix=prefix).publish(sid, "bogus", {})
