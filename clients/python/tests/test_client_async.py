"""AsyncHeraldClient against the real herald binary."""

from __future__ import annotations

import asyncio

import pytest

from herald_client import AsyncHeraldClient, Clarification, Completed, HeraldError, HeraldPublisher, ModelResult, Progress
from helpers import until




def test_async_typed_events_and_coroutine_callbacks(herald_url, session_id):
    pub = HeraldPublisher(herald_url)
    pub.progress(session_id, status="PROCESSING", progress=10, custom={"a": 1})
    pub.model_result(session_id, prompt_id="p", model_name="m", status="processing", result="par")

    async def main():
        got = []

        async def on_event(ev):
            await asyncio.sleep(0)  # a coroutine callback that yields must not reorder
            got.append(ev)

        async with AsyncHeraldClient(herald_url) as client:
            await client.subscribe(session_id, on_event)
            pub.completed(session_id, result={"ok": True})
            await until(lambda: len(got) == 3)
        return got

    p, m, c = asyncio.run(main())
    assert isinstance(p, Progress) and p.extra == {"custom": {"a": 1}} and p.seq == 1
    assert isinstance(m, ModelResult) and m.status == "processing" and m.result == "par"
    assert isinstance(c, Completed) and c.result == {"ok": True} and c.seq == 3


def test_async_forced_disconnect_mid_run(herald_url):
    async def main():
        events, answered = [], set()
        async with AsyncHeraldClient(herald_url, transports=["websocket"]) as client:
            snap = await client.create_session(["Tell me about [clarify] rust", "Why is the sky blue?"],
                                               models=["sim-slow", "sim-balanced"])
            session_id = snap["sessionId"]
            await client.subscribe(session_id, events.append)
            await until(lambda: any(isinstance(e, Clarification) for e in events), what="clarification")
            first = client._sio.sid
            r = await client._request("POST", f"/api/dev/session/{session_id}/drop-sockets")
            assert r["dropped"] >= 1
            await until(lambda: client.connected and client._sio.sid not in (None, first)
                        and not client.subscriptions[session_id].awaiting, what="reconnect")
            while not any(isinstance(e, Completed) for e in events):
                for e in list(events):
                    if isinstance(e, Clarification) and e.status == "pending" and e.clarification_id not in answered:
                        answered.add(e.clarification_id)
                        await client.respond(session_id, e.clarification_id, "ownership")
                if answered and len(events) > 8 and "dropped" not in answered:
                    answered.add("dropped")
                    await client._request("POST", f"/api/dev/session/{session_id}/drop-sockets")
                await asyncio.sleep(0.02)
            head = (await client.get_session(session_id))["lastSeq"]
            await until(lambda: events[-1].seq == head, what="every event")
            return events, head

    events, head = asyncio.run(asyncio.wait_for(main(), 80))
    assert [e.seq for e in events] == list(range(1, head + 1))
    assert isinstance(events[-1], Completed)


def test_async_resync_and_errors(herald_server_factory, session_id):
    srv = herald_server_factory("--max-events-per-session", "3")
    pub = HeraldPublisher(srv.url)
    for i in range(10):
        pub.progress(session_id, status="PROCESSING", progress=i)

    async def main():
        resyncs, got = [], []

        async def on_resync(snapshot):
            resyncs.append(snapshot)

        async with AsyncHeraldClient(srv.url) as client:
            await client.subscribe(session_id, got.append, on_resync=on_resync, last_seq=1)
            await until(lambda: resyncs, what="on_resync")
            pub.progress(session_id, status="COMPLETED", progress=100)
            await until(lambda: got, what="live event")
            with pytest.raises(HeraldError) as e:
                await client.get_session("unknown-" + session_id)
            assert (e.value.status, e.value.code) == (404, "SESSION_NOT_FOUND")
            with pytest.raises(HeraldError) as e:
                await client.create_session([], models=["sim-fast"])
            assert e.value.status == 400
            with pytest.raises(HeraldError) as e:
                await client.subscribe("")
            assert e.value.code == "INVALID_SESSION_ID"
        return resyncs, got

    resyncs, got = asyncio.run(main())
    assert resyncs[0]["lastSeq"] == 10
    assert [e.seq for e in got] == [11]
