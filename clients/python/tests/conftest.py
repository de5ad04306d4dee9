"""Fixtures: real herald servers (HERALD_BIN, default <repo>/target/debug/herald), each
stopped with SIGTERM at the end with exit code 0 asserted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[3]
HERALD_BIN = os.environ.get("HERALD_BIN") or str(REPO / "target" / "debug" / "herald")
LISTEN_RE = re.compile(r"listening on http://([^:\s]+):(\d+)")


class Herald:
    def __init__(self, *extra: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([HERALD_BIN, "serve", "--host", "127.0.0.1", "--port", "0", "--dev", *extra],
                                     stdout=subprocess.PIPE, stderr=self._log)
        ready = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                m = LISTEN_RE.search(raw.decode(errors="replace"))
                if m and not ready.is_set():
                    self.url = f"http://{m.group(1)}:{m.group(2)}"
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            self.proc.kill()
            raise RuntimeError(f"herald did not start; see {log_path}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


@pytest.fixture(scope="module")
def herald_server_factory(tmp_path_factory):
    servers: List[Herald] = []

    def start(*extra: str) -> Herald:
        srv = Herald(*extra, log_path=tmp_path_factory.mktemp("herald") / "stderr.log")
        servers.append(srv)
        return srv

    yield start
    codes = [(s.stop(), s.log_path) for s in servers]
    assert all(code == 0 for code, _ in codes), f"herald exit codes: {codes}"


@pytest.fixture(scope="module")
def herald_url(herald_server_factory) -> str:
    return herald_server_factory().url


@pytest.fixture
def session_id() -> str:
    return f"pyc-{uuid.uuid4().hex[:16]}"
