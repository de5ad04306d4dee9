"""Test helpers: bounded waits and a loopback HTTP proxy that can fail on purpose."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from typing import Callable, Dict, List

import requests


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """`wait_until` for asyncio tests: polls without blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def history(base: str, sid: str) -> List[dict]:
    r = requests.get(f"{base}/api/wizard/session/{sid}/events", params={"after": 0, "limit": 1000}, timeout=5)
    return r.json()["events"] if r.status_code == 200 else []


class FlakyProxy:
    """Forwards POSTs to herald. ``plan`` says what each successive request gets:
    ``"503"`` (not forwarded), ``"lost"`` (forwarded, then answered 502 as if the answer
    was lost), ``"reset"`` (connection closed unanswered), ``"ok"`` (forwarded). Records
    each request's headers and body."""

    def __init__(self, upstream: str, plan: List[str]) -> None:
        self.plan = list(plan)
        self.requests: List[Dict] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.requests.append({"headers": dict(self.headers), "body": body})
                step = proxy.plan.pop(0) if proxy.plan else "ok"
                if step == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if step == "503":
                    self._answer(503, b'{"error":{"code":"NOT_READY","message":"try again"}}')
                    return
                r = requests.post(upstream + self.path, data=body,
                                  headers={"content-type": "application/json"}, timeout=5)
                if step == "lost":
                    self._answer(502, b"bad gateway")
                else:
                    self._answer(r.status_code, r.content)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
