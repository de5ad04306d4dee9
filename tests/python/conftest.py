"""Fixtures: one real herald server per test module, stopped with SIGTERM (exit 0 asserted)."""

from __future__ import annotations

import pytest

from heraldtest import HeraldServer, new_sid


@pytest.fixture(scope="module")
def herald_factory(tmp_path_factory, request):
    """Start extra herald servers (e.g. with other flags); each is SIGTERMed and must exit 0."""
    servers: list[HeraldServer] = []
    modname = request.module.__name__.rsplit(".", 1)[-1]

    def start(*extra_args, env=None) -> HeraldServer:
        log = tmp_path_factory.mktemp(f"herald-{modname}") / "stderr.log"
        srv = HeraldServer(extra_args, log_path=log, env=env).start()
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
