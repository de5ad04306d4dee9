"""Fixtures: one real herald server per test module, stopped with SIGTERM (exit 0 asserted)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from heraldtest import HeraldServer, new_sid

REDIS_SERVER = os.environ.get("HERALD_TEST_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(scope="module")
def herald_factory(tmp_path_factory, request):
    """Start extra herald servers (e.g. with other flags); each is SIGTERMed and must exit 0."""
    servers: list[HeraldServer] = []
    modname = request.module.__name__.rsplit(".", 1)[-1]

    def start(*extra_args, env=None, dev=True) -> HeraldServer:
        log = tmp_path_factory.mktemp(f"herald-{modname}") / "stderr.log"
        srv = HeraldServer(extra_args, log_path=log, env=env, dev=dev).start()
        servers.append(srv)
        return srv

    yield start
    failures = []
    for srv in servers:
        if getattr(srv, "checked", False):  # a test already stopped and checked it
            continue
        try:
            srv.stop_and_check()
        except AssertionError as e:  # report every server, not just the first
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


@pytest.fixture(scope="module")
def herald(herald_factory) -> HeraldServer:
    """The module's herald server."""
    return herald_factory()


@pytest.fixture(scope="module")
def base(herald) -> str:
    return herald.url


@pytest.fixture
def sid() -> str:
    """A session id no other test uses."""
    return new_sid()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of the module's own on a free loopback port, stopped at the end."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 5
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()
