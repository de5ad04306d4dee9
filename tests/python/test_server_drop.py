"""herald's own cut-offs drop the transport: an unchanged python-socketio client with
reconnection on comes back by itself and, re-subscribing with its last seq, misses nothing.

(A Socket.IO DISCONNECT packet, or an Engine.IO CLOSE packet, would end it for good:
python-socketio does not retry a disconnect the server asked for.)
"""

from __future__ import annotations

import threading

import pytest
import requests
import socketio

from heraldtest import WAIT, post_ok


def progress(n):
    return {"event": "progress", "data": {"status": "PROCESSING", "progress": n, "n": n}}


class Follower:
    """A script as our users write it: plain socketio.Client, reconnection on, and a
    `connect` handler that (re)subscribes with the last seq it saw."""

    def __init__(self, base, sid, transport):
        self.sio = socketio.Client(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1)
        self.sid = sid
        self.seqs: list[int] = []
        self.connects = 0
        self.reasons: list[object] = []
        self.cond = threading.Condition()
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("progress", self._on_progress)
        self.sio.connect(base, transports=[transport], wait_timeout=WAIT)

    def _on_connect(self):
        with self.cond:
            self.connects += 1
            last = self.seqs[-1] if self.seqs else 0
            self.cond.notify_all()
        self.sio.emit("subscribe", {"sessionId": self.sid, "lastSeq": last})

    def _on_disconnect(self, reason=None):
        with self.cond:
            self.reasons.append(reason)
            self.cond.notify_all()

    def _on_progress(self, event):
        with self.cond:
            self.seqs.append(event["seq"])
            self.cond.notify_all()

    def wait(self, pred, what):
        with self.cond:
            assert self.cond.wait_for(pred, WAIT), f"timed out waiting for {what}: seqs={self.seqs} connects={self.connects} reasons={self.reasons}"


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_a_server_side_drop_is_retried_by_an_unchanged_client(base, sid, transport):
    f = Follower(base, sid, transport)
    try:
        f.wait(lambda: f.connects == 1, "the first connect")
        post_ok(base, sid, [progress(1), progress(2)])
        f.wait(lambda: len(f.seqs) == 2, "the first events")

        r = requests.post(f"{base}/api/dev/session/{sid}/drop-sockets", timeout=WAIT)
        assert r.status_code == 200 and r.json()["dropped"] == 1, r.text
        f.wait(lambda: len(f.reasons) == 1, "the disconnect")
        assert f.reasons[0] != socketio.Client.reason.SERVER_DISCONNECT, f.reasons
        post_ok(base, sid, [progress(3), progress(4)])
        f.wait(lambda: f.connects == 2, "the client reconnecting by itself")
        f.wait(lambda: len(f.seqs) == 4, "the missed events, replayed")
        assert f.seqs == [1, 2, 3, 4]
    finally:
        f.sio.disconnect()
