"""Smoke tests: examples/seed_client.py (plain python-socketio) and examples/ocr_worker.py
run as subprocesses against the real herald binary."""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from helpers import history, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REDIS_SERVER = os.environ.get("HERALD_TEST_REDIS_SERVER") or shutil.which("redis-server")


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "ocr_worker.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_seed_client_follows_the_ocr_worker(herald_url, session_id):
    env = {**os.environ, "HERALD_URL": herald_url}
    seed = subprocess.Popen([sys.executable, str(EXAMPLES / "seed_client.py"), session_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in seed.stdout], daemon=True)
    reader.start()
    out = []
    try:
        while not any(line.startswith("subscribed") for line in out):
            out.append(lines.get(timeout=20))
        worker = run_worker("--url", herald_url, "--job", session_id, "--pages", "3")
        assert worker.returncode == 0, worker.stderr
        assert worker.stdout.splitlines() == ["page 1/3 done", "page 2/3 done", "page 3/3 done", f"job {session_id} completed"]
        assert seed.wait(30) == 0, seed.stderr.read()
    finally:
        if seed.poll() is None:
            seed.kill()
            seed.wait()
    reader.join(10)  # the seed client exited: its stdout is at EOF
    while not lines.empty():
        out.append(lines.get_nowait())
    # python-socketio runs each handler on its own thread: lines may come in any order
    # (and print's newline may land after another line), so read the whole text
    text = "\n".join(out)
    assert text.startswith("connected") and f"subscribed {session_id} lastSeq 0" in text
    found = re.findall(r"(progress|model_result|clarification|completed|error) (\d+) ", text)
    assert sorted(int(seq) for _, seq in found) == list(range(1, 9))
    assert [name for name, _ in found].count("model_result") == 3
    assert [name for name, _ in found].count("progress") == 4
    assert ("completed", "8") in found and "'pages': 3" in text and f"{session_id} page 3: lorem" in text
    logged = history(herald_url, session_id)
    assert [e["event"] for e in logged] == ["progress"] + ["model_result", "progress"] * 3 + ["completed"]
    assert logged[-2]["data"]["status"] == "COMPLETED" and logged[-2]["data"]["page"] == 3
    # running the worker again for the same job logs nothing twice
    assert run_worker("--url", herald_url, "--job", session_id, "--pages", "3").returncode == 0
    assert len(history(herald_url, session_id)) == 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not REDIS_SERVER, reason="redis-server not installed")
def test_ocr_worker_through_redis(herald_server_factory, session_id):
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    try:
        client = redis.Redis.from_url(url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout=10, what="redis-server")
        srv = herald_server_factory("--redis-url", url, "--redis-prefix", "ocr-" + session_id)
        worker = run_worker("--redis-url", url, "--redis-prefix", "ocr-" + session_id, "--job", session_id, "--pages", "2")
        assert worker.returncode == 0, worker.stderr
        wait_until(lambda: len(history(srv.url, session_id)) >= 6, what="events through Redis")
        logged = history(srv.url, session_id)
        assert [e["event"] for e in logged] == ["progress", "model_result", "progress", "model_result", "progress",
                                                "completed"]
        srv.stop()
    finally:
        proc.kill()
        proc.wait()
