"""HTTP routes: a table of bad inputs per route, each with status, error.code and "nothing logged"."""

from __future__ import annotations

import json

import pytest
import requests

from heraldtest import TS_RE, WAIT, assert_error, get_events, new_sid, post_events, post_ok, sample_events

INVALID_JSON = "INVALID_JSON"
INVALID_EVENT = "INVALID_EVENT"
INVALID_SESSION_ID = "INVALID_SESSION_ID"


def ev(event, **data):
    return {"event": event, "data": data}


PROGRESS = dict(status="PROCESSING", progress=10)
MODEL = dict(promptId="p1", modelName="m1", status="processing")
CLAR = dict(clarificationId="c1", question="why?", status="pending")
COMPLETED = dict(result={"a": 1})
ERROR = dict(error="boom")


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


def with_(d, **kw):
    return {**d, **kw}


# (id, JSON body) -> 400 INVALID_EVENT
INVALID_EVENT_CASES = [
    # top level shape
    ("body-string", "hello"),
    ("body-number", 42),
    ("body-null", None),
    ("body-true", True),
    ("empty-object", {}),
    ("batch-with-non-object", [ev("progress", **PROGRESS), 5]),
    # event name
    ("unknown-event", ev("bogus", **PROGRESS)),
    ("event-missing", {"data": PROGRESS}),
    ("event-not-string", {"event": 123, "data": PROGRESS}),
    ("event-null", {"event": None, "data": PROGRESS}),
    ("event-wrong-case", ev("Progress", **PROGRESS)),
    ("server-only-event-connected", {"event": "connected", "data": {"socketId": "x"}}),
    ("server-only-event-subscribed", {"event": "subscribed", "data": {}}),
    # data not an object
    ("data-missing", {"event": "completed"}),
    ("data-null", {"event": "error", "data": None}),
    ("data-array", {"event": "progress", "data": [PROGRESS]}),
    ("data-string", {"event": "error", "data": "boom"}),
    ("data-number", {"event": "completed", "data": 1}),
    # missing required fields per kind
    ("progress-no-status", ev("progress", **without(PROGRESS, "status"))),
    ("progress-no-progress", ev("progress", **without(PROGRESS, "progress"))),
    ("model-no-promptId", ev("model_result", **without(MODEL, "promptId"))),
    ("model-no-modelName", ev("model_result", **without(MODEL, "modelName"))),
    ("model-no-status", ev("model_result", **without(MODEL, "status"))),
    ("clar-no-clarificationId", ev("clarification", **without(CLAR, "clarificationId"))),
    ("clar-no-question", ev("clarification", **without(CLAR, "question"))),
    ("clar-no-status", ev("clarification", **without(CLAR, "status"))),
    ("completed-no-result", ev("completed")),
    ("error-no-error", ev("error", code="X")),
    # wrong types of required fields
    ("progress-progress-string", ev("progress", **with_(PROGRESS, progress="50"))),
    ("progress-progress-bool", ev("progress", **with_(PROGRESS, progress=True))),
    ("progress-progress-null", ev("progress", **with_(PROGRESS, progress=None))),
    ("progress-status-number", ev("progress", **with_(PROGRESS, status=5))),
    ("model-promptId-number", ev("model_result", **with_(MODEL, promptId=1))),
    ("model-modelName-null", ev("model_result", **with_(MODEL, modelName=None))),
    ("clar-question-array", ev("clarification", **with_(CLAR, question=["why"]))),
    ("clar-clarificationId-object", ev("clarification", **with_(CLAR, clarificationId={}))),
    ("completed-result-string", ev("completed", result="done")),
    ("completed-result-array", ev("completed", result=[1, 2])),
    ("completed-result-null", ev("completed", result=None)),
    ("error-error-object", ev("error", error={"msg": "boom"})),
    ("error-error-number", ev("error", error=500)),
    # wrong types of optional fields (type-checked when present)
    ("progress-hasClarifications-string", ev("progress", **with_(PROGRESS, hasClarifications="yes"))),
    ("progress-clarificationCount-string", ev("progress", **with_(PROGRESS, clarificationCount="1"))),
    ("progress-prompts-array", ev("progress", **with_(PROGRESS, prompts=[1, 2]))),
    ("model-duration-string", ev("model_result", **with_(MODEL, duration="fast"))),
    ("model-provider-number", ev("model_result", **with_(MODEL, provider=5))),
    ("model-result-number", ev("model_result", **with_(MODEL, result=5))),
    ("clar-answer-number", ev("clarification", **with_(CLAR, status="answered", answer=42))),
    ("error-code-number", ev("error", error="boom", code=5)),
    ("timestamp-number", ev("error", error="boom", timestamp=1700000000)),
    # progress out of range
    ("progress-101", ev("progress", **with_(PROGRESS, progress=101))),
    ("progress-minus-1", ev("progress", **with_(PROGRESS, progress=-1))),
    ("progress-100.5", ev("progress", **with_(PROGRESS, progress=100.5))),
    # bad status enums
    ("progress-status-lowercase", ev("progress", **with_(PROGRESS, status="processing"))),
    ("progress-status-bogus", ev("progress", **with_(PROGRESS, status="BOGUS"))),
    ("model-status-bogus", ev("model_result", **with_(MODEL, status="done"))),
    ("model-status-uppercase", ev("model_result", **with_(MODEL, status="COMPLETED"))),
    ("clar-status-bogus", ev("clarification", **with_(CLAR, status="open"))),
    # idempotencyKey of the wrong type
    ("idempotencyKey-number", {**ev("error", error="boom"), "idempotencyKey": 7}),
    # batch where only the last item is bad: all-or-nothing
    ("batch-last-bad", [ev("progress", **PROGRESS), ev("completed", **COMPLETED), ev("progress", **with_(PROGRESS, progress=101))]),
    ("batch-last-unknown", [ev("error", **ERROR), ev("nope", **ERROR)]),
]


def assert_nothing_logged_fresh(base, sid):
    r = get_events(base, sid, 0)
    assert_error(r, 404, "SESSION_NOT_FOUND")
    r = requests.get(f"{base}/api/wizard/session/{sid}", timeout=WAIT)
    assert_error(r, 404, "SESSION_NOT_FOUND")


def assert_log_unchanged(base, sid, seqs):
    r = get_events(base, sid, 0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["seq"] for e in body["events"]] == seqs, body
    assert body["lastSeq"] == (seqs[-1] if seqs else 0), body


@pytest.mark.parametrize("body", [pytest.param(b, id=i) for i, b in INVALID_EVENT_CASES])
def test_ingest_invalid_event_fresh_session(base, sid, body):
    r = post_events(base, sid, body)
    assert_error(r, 400, INVALID_EVENT)
    assert_nothing_logged_fresh(base, sid)


@pytest.mark.parametrize(
    "body",
    [pytest.param(b, id=i) for i, b in INVALID_EVENT_CASES if i.startswith(("batch", "progress-101", "unknown", "data-null"))],
)
def test_ingest_invalid_event_existing_session(base, sid, body):
    """Against a session that already has events: 400 and the log is untouched."""
    post_ok(base, sid, ev("progress", **PROGRESS))
    r = post_events(base, sid, body)
    assert_error(r, 400, INVALID_EVENT)
    assert_log_unchanged(base, sid, [1])
    # and the next good post gets seq 2: no seq was burnt by the rejected batch
    assert post_ok(base, sid, ev("error", **ERROR))["seqs"] == [2]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(ev("progress", **with_(PROGRESS, sessionId="someone-else")), id="mismatch"),
        pytest.param(ev("error", error="x", sessionId=5), id="not-a-string"),
        pytest.param([ev("error", **ERROR), ev("error", error="x", sessionId="other")], id="mismatch-in-batch"),
    ],
)
def test_ingest_data_session_id_mismatch(base, sid, body):
    r = post_events(base, sid, body)
    # the contract says it must equal the path id; either code is a fair reading
    assert_error(r, 400, {INVALID_EVENT, INVALID_SESSION_ID})
    assert_nothing_logged_fresh(base, sid)


def test_ingest_data_session_id_equal_is_fine(base, sid):
    r = post_ok(base, sid, ev("error", error="x", sessionId=sid))
    assert r["seqs"] == [1], r


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"event": "progress", ', id="truncated"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b"{event: progress}", id="unquoted"),
        pytest.param(b'{"event":"error","data":{"error":"x"}} trailing', id="trailing-garbage"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
    ],
)
def test_ingest_invalid_json(base, sid, raw):
    r = requests.post(
        f"{base}/api/sessions/{sid}/events",
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert_error(r, 400, INVALID_JSON)
    assert_nothing_logged_fresh(base, sid)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_ingest_wrong_content_type(base, sid, ctype):
    r = requests.post(
        f"{base}/api/sessions/{sid}/events",
        data=json.dumps(ev("error", **ERROR)),
        headers={"Content-Type": ctype},
        timeout=WAIT,
    )
    assert_error(r, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_nothing_logged_fresh(base, sid)


def test_ingest_json_with_charset_is_accepted(base, sid):
    r = requests.post(
        f"{base}/api/sessions/{sid}/events",
        data=json.dumps(ev("error", **ERROR)).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
        timeout=WAIT,
    )
    assert r.status_code == 202, r.text
    assert r.json()["seqs"] == [1]


@pytest.mark.parametrize(
    "path_id",
    [
        pytest.param("bad%20id", id="space"),
        pytest.param("x" * 129, id="129-chars"),
        pytest.param("-dash-first", id="leading-dash"),
        pytest.param("_under-first", id="leading-underscore"),
        pytest.param("a%2Fb", id="encoded-slash"),
        pytest.param("caf%C3%A9", id="non-ascii"),
        pytest.param("a%21", id="bang"),
    ],
)
def test_ingest_invalid_session_id_in_path(base, path_id):
    r = requests.post(f"{base}/api/sessions/{path_id}/events", json=ev("error", **ERROR), timeout=WAIT)
    assert_error(r, 400, INVALID_SESSION_ID)


def test_ingest_longest_valid_session_id(base):
    sid = "A" + "b_.:-9" * 21 + "x"  # 128 chars, every allowed punctuation
    assert len(sid) == 128
    r = post_ok(base, sid, ev("error", **ERROR))
    assert r["seqs"] == [1], r
    r = get_events(base, sid, 0)
    assert r.status_code == 200 and r.json()["sessionId"] == sid, r.text


def test_ingest_empty_batch(base, sid):
    r = post_events(base, sid, [])
    assert_error(r, 400, "EMPTY_BATCH")
    assert_nothing_logged_fresh(base, sid)


def test_ingest_server_assigns_seq_and_keeps_producer_timestamp(base, sid):
    items = [
        ev("progress", **with_(PROGRESS, seq=999, timestamp="2020-01-02T03:04:05.678Z")),
        ev("error", error="x", seq=1),
    ]
    r = post_ok(base, sid, items)
    assert (r["accepted"], r["duplicates"], r["lastSeq"], r["seqs"]) == (2, 0, 2, [1, 2]), r
    body = get_events(base, sid, 0).json()
    assert [e["seq"] for e in body["events"]] == [1, 2], body
    first = body["events"][0]
    assert first["event"] == "progress", first
    assert first["data"].get("seq", 1) == 1, first  # never the producer's 999
    assert first["data"]["timestamp"] == "2020-01-02T03:04:05.678Z", first
    assert first["data"]["sessionId"] == sid, first


# ---------------------------------------------------------------------- read routes


def test_snapshot_unknown_session(base, sid):
    r = requests.get(f"{base}/api/wizard/session/{sid}", timeout=WAIT)
    assert_error(r, 404, "SESSION_NOT_FOUND")


def test_events_unknown_session(base, sid):
    assert_error(get_events(base, sid, 0), 404, "SESSION_NOT_FOUND")


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"after": "-1"}, id="after-negative"),
        pytest.param({"after": "abc"}, id="after-abc"),
        pytest.param({"after": "1.5"}, id="after-float"),
        pytest.param({"after": "0", "limit": "0"}, id="limit-zero"),
        pytest.param({"after": "0", "limit": "-5"}, id="limit-negative"),
        pytest.param({"after": "0", "limit": "many"}, id="limit-abc"),
    ],
)
def test_events_bad_query(base, sid, params):
    post_ok(base, sid, ev("error", **ERROR))
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params=params, timeout=WAIT)
    assert_error(r, 400)


def test_events_after_and_limit(base, sid):
    post_ok(base, sid, sample_events("lim"))
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 1, "limit": 2}, timeout=WAIT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["seq"] for e in body["events"]] == [2, 3], body
    assert body["lastSeq"] == 5 and body["sessionId"] == sid, body
    assert isinstance(body.get("epoch"), str) and body["epoch"], body
    assert body.get("truncated") in (True, False), body
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 5}, timeout=WAIT)
    assert r.status_code == 200 and r.json()["events"] == [], r.text


def test_snapshot_after_ingest(base, sid):
    post_ok(base, sid, sample_events("snap"))
    r = requests.get(f"{base}/api/wizard/session/{sid}", timeout=WAIT)
    assert r.status_code == 200, r.text
    snap = r.json()
    assert snap["sessionId"] == sid and snap["lastSeq"] == 5, snap
    # every field docs/protocol.md lists for the snapshot is present
    documented = {
        "sessionId", "status", "progress", "prompts", "hasClarifications", "clarificationCount",
        "clarifications", "modelResults", "result", "lastSeq", "epoch", "createdAt", "updatedAt", "metadata",
    }
    assert documented <= set(snap), f"snapshot lacks {sorted(documented - set(snap))}: {snap}"
    assert snap["epoch"] == get_events(base, sid, 0).json()["epoch"], snap
    assert isinstance(snap["clarifications"], list) and isinstance(snap["modelResults"], list), snap
    for k in ("createdAt", "updatedAt"):
        assert isinstance(snap[k], str) and TS_RE.match(snap[k]), snap


@pytest.mark.parametrize("status", ["BOGUS", "done"])
def test_sessions_unknown_status(base, status):
    r = requests.get(f"{base}/api/wizard/sessions", params={"status": status}, timeout=WAIT)
    assert_error(r, 400)


def test_sessions_known_status(base):
    r = requests.get(f"{base}/api/wizard/sessions", params={"status": "ACTIVE"}, timeout=WAIT)
    assert r.status_code == 200, r.text
    assert isinstance(r.json().get("sessions"), list), r.text


@pytest.mark.parametrize("path", ["/api/wizard/session/bad%20id", "/api/wizard/session/bad%20id/events?after=0"])
def test_read_routes_invalid_session_id(base, path):
    r = requests.get(f"{base}{path}", timeout=WAIT)
    # an id that can never exist: 400 INVALID_SESSION_ID, or at least a JSON 404 SESSION_NOT_FOUND
    assert r.status_code in (400, 404), (r.status_code, r.text)
    assert_error(r, r.status_code, INVALID_SESSION_ID if r.status_code == 400 else "SESSION_NOT_FOUND")


# ---------------------------------------------------------------------- body limit


@pytest.fixture(scope="module")
def small(herald_factory):
    return herald_factory("--max-body", "1024")


def test_body_over_limit(small, sid):
    body = ev("error", error="x", pad="y" * 2048)
    r = post_events(small.url, sid, body)
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert_nothing_logged_fresh(small.url, sid)


def test_body_over_limit_chunked(small, sid):
    raw = json.dumps(ev("error", error="x", pad="y" * 2048)).encode()
    r = requests.post(
        f"{small.url}/api/sessions/{sid}/events",
        data=iter([raw[:700], raw[700:]]),  # no Content-Length: chunked transfer encoding
        headers={"Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert_nothing_logged_fresh(small.url, sid)


def test_body_under_limit_accepted(small, sid):
    body = ev("error", error="x", pad="y" * 700)
    assert len(json.dumps(body)) < 1024
    assert post_ok(small.url, sid, body)["seqs"] == [1]
