"""follow_sessions() (sync and asyncio) against the real herald binary: the list, live
changes, and a server-side drop healed by the reconnect's fresh list."""

from __future__ import annotations

import asyncio

import requests

from herald_client import AsyncHeraldClient, HeraldClient, HeraldPublisher
from helpers import wait_until


def _progress_of(feed, session_id):
    entry = next((s for s in feed.sessions if s["sessionId"] == session_id), None)
    return entry and entry["progress"]


def test_follow_sessions_lists_updates_and_resyncs_after_a_drop(herald_url, session_id):
    pub = HeraldPublisher(herald_url)
    pub.progress(session_id, status="PROCESSING", progress=10)
    changes = []
    with HeraldClient(herald_url, transports=["websocket"]) as client:
        feed = client.follow_sessions(on_session=changes.append)
        assert feed.synced and _progress_of(feed, session_id) == 10
        created = [s["createdAt"] for s in feed.sessions]
        assert created == sorted(created, reverse=True), "newest first"

        pub.progress(session_id, status="PROCESSING", progress=20)
        wait_until(lambda: _progress_of(feed, session_id) == 20, what="the change in the feed")
        wait_until(lambda: any(c["sessionId"] == session_id for c in changes), what="on_session called")

        # The feed's socket also follows the session, so the dev drop cuts it off; a change
        # made while it is away must show after the reconnect.
        client.subscribe(session_id, last_seq=None)
        r = requests.post(f"{herald_url}/api/dev/session/{session_id}/drop-sockets", timeout=5)
        assert r.status_code == 200
        wait_until(lambda: not feed.synced, what="the drop noticed")
        pub.progress(session_id, status="PROCESSING", progress=30)
        wait_until(lambda: feed.synced and _progress_of(feed, session_id) == 30, timeout=15,
                   what="the change made while away, after the reconnect")

        feed.stop()
        with HeraldClient(herald_url, transports=["websocket"]) as other:
            watching = other.follow_sessions()
            pub.progress(session_id, status="PROCESSING", progress=40)
            wait_until(lambda: _progress_of(watching, session_id) == 40, what="the change in another feed")
        assert _progress_of(feed, session_id) == 30, "a stopped feed takes no more changes"

def test_async_follow_sessions_sees_a_new_session(herald_url, session_id):
    async def main():
        async with AsyncHeraldClient(herald_url, transports=["websocket"]) as client:
            listed = []
            feed = await client.follow_sessions(on_sessions=listed.append)
            assert feed.synced
            HeraldPublisher(herald_url).progress(session_id, status="PROCESSING", progress=55)
            for _ in range(1000):
                if _progress_of(feed, session_id) == 55:
                    break
                await asyncio.sleep(0.01)
            assert _progress_of(feed, session_id) == 55
            assert listed and any(s["sessionId"] == session_id for s in listed[-1])
            await feed.stop()
    asyncio.run(asyncio.wait_for(main(), 30))
