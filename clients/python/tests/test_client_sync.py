"""HeraldClient (sync) against the real herald binary."""

from __future__ import annotations

import threading

import pytest
import requests

from herald_client import (Clarification, Completed, Error, HeraldClient, HeraldError, HeraldPublisher, ModelResult,
                           Progress, PromptCounts)
from helpers import history, wait_until


def test_typed_events(herald_url, session_id):
    got = []
    pub = HeraldPublisher(herald_url)
    pub.progress(session_id, status="PROCESSING", progress=40,
                 prompts={"total": 5, "completed": 2, "processing": 1, "pending": 2, "failed": 0},
                 has_clarifications=False, clarification_count=0, page=3)
    pub.model_result(session_id, prompt_id="p1", model_name="ocr-v2", provider="tesseract", duration=12,
                     result="text", status="completed")
    pub.clarification(session_id, clarification_id="c-1", question="Which language?", status="pending")
    # An error ends a session for producers, so the two terminal events go in one batch.
    pub.publish_batch(session_id, [
        {"event": "error", "data": {"error": "page 4 unreadable", "code": "OCR_FAILED"}},
        {"event": "completed", "data": {"result": {"pages": 5}}},
    ])
    with pytest.raises(HeraldError) as late:
        pub.error(session_id, "too late")
    assert (late.value.status, late.value.code) == (409, "SESSION_ENDED")
    with HeraldClient(herald_url) as client:
        by_type = []
        sub = client.subscribe(session_id, on_event=got.append, on_completed=by_type.append)
        wait_until(lambda: len(got) == 5, what="5 events")
        assert sub.last_seq == 5 and sub.epoch
    p, m, c, e, done = got
    assert isinstance(p, Progress) and p.seq == 1 and p.session_id == session_id and p.status == "PROCESSING"
    assert p.progress == 40 and p.prompts == PromptCounts(total=5, completed=2, processing=1, pending=2, failed=0)
    assert p.has_clarifications is False and p.extra == {"page": 3} and p.timestamp.endswith("Z")
    assert isinstance(m, ModelResult) and (m.prompt_id, m.model_name, m.provider, m.status) == (
        "p1", "ocr-v2", "tesseract", "completed") and m.result == "text"
    assert isinstance(c, Clarification) and c.clarification_id == "c-1" and c.question == "Which language?"
    assert isinstance(e, Error) and e.error == "page 4 unreadable" and e.code == "OCR_FAILED" and e.seq == 4
    assert isinstance(done, Completed) and done.result == {"pages": 5} and done.seq == 5
    assert by_type == [done]


def test_live_only_subscription_gets_new_events(herald_url, session_id):
    pub = HeraldPublisher(herald_url)
    pub.progress(session_id, status="ACTIVE", progress=0)
    got = []
    with HeraldClient(herald_url, transports=["websocket"]) as client:
        client.subscribe(session_id, got.append, last_seq=None)
        pub.progress(session_id, status="PROCESSING", progress=50)
        wait_until(lambda: len(got) == 1)
        assert got[0].seq == 2


def test_forced_disconnect_mid_run_delivers_every_seq_once_in_order(herald_url):
    events = []
    done = threading.Event()
    clarifications = []

    def on_event(ev):
        events.append(ev)
        if isinstance(ev, Clarification) and ev.status == "pending":
            clarifications.append(ev)
        if isinstance(ev, Completed):
            done.set()

    with HeraldClient(herald_url) as client:
        snap = client.create_session(["Explain [clarify] closures", "What is a monad?"],
                                     models=["sim-slow", "sim-fast"])
        session_id = snap["sessionId"]
        client.subscribe(session_id, on_event)
        wait_until(lambda: clarifications, what="a pending clarification")
        # the run is paused on the clarification: drop our socket server side
        first_sid = client._sio.sid
        r = requests.post(f"{herald_url}/api/dev/session/{session_id}/drop-sockets", timeout=5)
        assert r.status_code == 200 and r.json()["dropped"] >= 1
        wait_until(lambda: client.connected and client._sio.sid not in (None, first_sid)
                   and not client.subscriptions[session_id].awaiting, what="reconnected and resubscribed")
        answered = set()

        def answer_pending():  # every model that asks gets its own clarification
            for c in list(clarifications):
                if c.clarification_id not in answered:
                    answered.add(c.clarification_id)
                    client.respond(session_id, c.clarification_id, "the closures")

        answer_pending()
        # and drop again while the models run
        wait_until(lambda: len(events) > len(clarifications) + 3, what="more events")
        assert client.get_session(session_id)["status"] == "PROCESSING"  # still running
        r = requests.post(f"{herald_url}/api/dev/session/{session_id}/drop-sockets", timeout=5)
        assert r.status_code == 200 and r.json()["dropped"] >= 1
        wait_until(lambda: (answer_pending(), done.is_set())[1], timeout=60, what="Completed")
        head = client.get_session(session_id)["lastSeq"]
        wait_until(lambda: events and events[-1].seq == head, what="all events")
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, head + 1))
    assert isinstance(events[-1], Completed), [type(e).__name__ for e in events[-3:]]
    assert [h["seq"] for h in history(herald_url, session_id)] == seqs
    assert any(isinstance(e, Clarification) and e.status == "answered" for e in events)


def test_recovered_false_calls_on_resync(herald_server_factory, session_id):
    srv = herald_server_factory("--max-events-per-session", "3")
    pub = HeraldPublisher(srv.url)
    for i in range(10):
        pub.progress(session_id, status="PROCESSING", progress=i * 10)
    resyncs, got = [], []
    with HeraldClient(srv.url) as client:
        sub = client.subscribe(session_id, got.append, on_resync=resyncs.append, last_seq=1)
        wait_until(lambda: resyncs, what="on_resync")
        assert resyncs[0]["lastSeq"] == 10 and resyncs[0]["progress"] == 90
        assert got == [] and sub.last_seq == 10
        pub.progress(session_id, status="PROCESSING", progress=95)
        wait_until(lambda: got, what="live event after resync")
        assert [e.seq for e in got] == [11] and got[0].progress == 95


def test_herald_errors(herald_url, session_id):
    with HeraldClient(herald_url) as client:
        with pytest.raises(HeraldError) as e:
            client.get_session(session_id)
        assert (e.value.status, e.value.code) == (404, "SESSION_NOT_FOUND")
        with pytest.raises(HeraldError) as e:
            client.create_session(["hi"], models=["no-such-model"])
        assert (e.value.status, e.value.code) == (400, "UNKNOWN_MODEL")
        with pytest.raises(HeraldError) as e:
            client.cancel(session_id)
        assert e.value.status == 404
        with pytest.raises(HeraldError) as e:
            client.respond(session_id, "nope", "x")
        assert e.value.status == 404 and e.value.code == "SESSION_NOT_FOUND"
        with pytest.raises(HeraldError) as e:
            client.subscribe("bad id!")
        assert e.value.code == "INVALID_SESSION_ID" and e.value.status is None
        snap = client.create_session(["hi"], models=["sim-fast"])
        client.cancel(snap["sessionId"])
        with pytest.raises(HeraldError) as e:
            client.cancel(snap["sessionId"])
        assert (e.value.status, e.value.code) == (409, "SESSION_ENDED")
    with pytest.raises(HeraldError) as e:
        HeraldPublisher(herald_url).progress(session_id, status="WRONG", progress=1)
    assert (e.value.status, e.value.code) == (400, "INVALID_EVENT")
    with pytest.raises(HeraldError) as e:
        HeraldClient("http://127.0.0.1:9", request_timeout=2).get_session(session_id)
    assert e.value.code == "CONNECTION_FAILED"
