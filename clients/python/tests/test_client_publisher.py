"""HeraldPublisher: retries on 5xx and connection errors, idempotency keys, api_key."""

from __future__ import annotations

import json

import pytest

from herald_client import HeraldError, HeraldPublisher, RedisPublisher
from helpers import FlakyProxy, history


def test_same_key_twice_is_logged_once(herald_url, session_id):
    pub = HeraldPublisher(herald_url)
    first = pub.progress(session_id, status="PROCESSING", progress=10, idempotency_key="job:page-1")
    again = pub.progress(session_id, status="PROCESSING", progress=10, idempotency_key="job:page-1")
    assert first["accepted"] == 1 and again["duplicates"] == 1 and again["seqs"] == first["seqs"]
    pub.progress(session_id, status="PROCESSING", progress=20)  # generated key: a new event
    pub.progress(session_id, status="PROCESSING", progress=20)
    assert [e["seq"] for e in history(herald_url, session_id)] == [1, 2, 3]


def test_retries_after_503_reset_and_lost_answer_log_once(herald_url, session_id):
    proxy = FlakyProxy(herald_url, ["503", "reset", "lost", "ok"])
    try:
        pub = HeraldPublisher(proxy.url, api_key="s3cret", retries=4, backoff=0.01)
        answer = pub.model_result(session_id, prompt_id="page-1", model_name="ocr", status="completed", result="hello")
        # the "lost" attempt was logged by herald; the retry carried the same key
        assert answer["duplicates"] == 1 and answer["seqs"] == [1]
        assert len(proxy.requests) == 4
        keys = {json.loads(r["body"])["idempotencyKey"] for r in proxy.requests}
        assert len(keys) == 1
        assert all(r["headers"].get("Authorization") == "Bearer s3cret" for r in proxy.requests)
        events = history(herald_url, session_id)
        assert len(events) == 1 and events[0]["data"]["promptId"] == "page-1"
    finally:
        proxy.close()


def test_gives_up_after_retries_and_does_not_retry_4xx(herald_url, session_id):
    proxy = FlakyProxy(herald_url, ["503"] * 3)
    try:
        pub = HeraldPublisher(proxy.url, retries=2, backoff=0.01)
        with pytest.raises(HeraldError) as e:
            pub.completed(session_id, result={})
        assert (e.value.status, e.value.code) == (503, "NOT_READY") and len(proxy.requests) == 3
        proxy.requests.clear()
        with pytest.raises(HeraldError) as e:
            pub.clarification(session_id, clarification_id="c", question="?", status="bogus")
        assert (e.value.status, e.value.code) == (400, "INVALID_EVENT") and len(proxy.requests) == 1
    finally:
        proxy.close()
    with pytest.raises(HeraldError) as e:
        HeraldPublisher("http://127.0.0.1:9", retries=1, backoff=0.01).error(session_id, "x")
    assert e.value.code == "CONNECTION_FAILED" and e.value.status is None
    with pytest.raises(ValueError):
        HeraldPublisher(herald_url).publish(session_id, "nope", {})


def test_batch_and_redis_publisher_still_importable(herald_url, session_id):
    pub = HeraldPublisher(herald_url)
    answer = pub.publish_batch(session_id, [{"event": "progress", "data": {"status": "ACTIVE", "progress": 0}},
                                     {"event": "completed", "data": {"result": {"n": 1}}, "idempotencyKey": "k"}])
    assert answer["seqs"] == [1, 2]
    assert callable(RedisPublisher.publish)
