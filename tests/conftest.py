"""Shared pytest fixtures: free loopback endpoints and the CLI as a subprocess command."""

from __future__ import annotations

import sys

import pytest

from streamer.sockets import free_tcp_endpoint


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (e.g. for torchrun's rendezvous)."""
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


@pytest.fixture
def endpoint_factory():
    """Call it to get a fresh ``tcp://127.0.0.1:PORT`` endpoint."""
    return free_tcp_endpoint


@pytest.fixture
def segdepth_cmd() -> list[str]:
    """The ``segdepth`` command line as argv for a real subprocess."""
    return [sys.executable, "-m", "segdepth"]
