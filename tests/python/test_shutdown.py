"""SIGTERM with live python-socketio clients: graceful exit with status 0."""

from __future__ import annotations

import asyncio
import threading

from heraldtest import WAIT, AsyncCollector, SyncCollector, new_sid, post_ok


def test_sigterm_with_connected_clients(herald_factory):
    srv = herald_factory()
    sid = new_sid()
    ws = SyncCollector().connect(srv.url, ["websocket"])
    poll = SyncCollector().connect(srv.url, ["polling"])
    try:
        for c in (ws, poll):
            c.first("connected")
            assert c.sio.call("subscribe", sid, timeout=WAIT).get("ok") is True
        post_ok(srv.url, sid, {"event": "error", "data": {"error": "x"}})
        for c in (ws, poll):
            c.wait_session_events(sid, 1, source="wire")

        srv.stop_and_check()  # SIGTERM, must exit 0 within the stop timeout
        for c in (ws, poll):
            assert c.disconnected.wait(WAIT), "client was not disconnected by the shutdown"
    finally:
        ws.disconnect()
        poll.disconnect()


def test_sigterm_with_connected_async_client(herald_factory):
    srv = herald_factory()
    done = threading.Event()

    async def main():
        c = AsyncCollector()
        gone = asyncio.Event()
        c.sio.on("disconnect", lambda *a: gone.set())
        await c.connect(srv.url, ["websocket"])
        await c.first("connected")
        # stop the server from a thread while the loop keeps running the client
        await asyncio.to_thread(srv.stop_and_check)
        await asyncio.wait_for(gone.wait(), WAIT)
        done.set()
        await c.disconnect()

    asyncio.run(main())
    assert done.is_set()
