"""Shared pytest fixtures: free loopback endpoints and the CLI as a subprocess command."""
from __future__ import annotations

import socket
import sys

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint_factory():
    """Call it to get a fresh ``tcp://127.0.0.1:PORT`` endpoint."""
    return lambda: f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def segdepth_cmd() -> list[str]:
    """The ``segdepth`` command line as argv for a real subprocess."""
    return [sys.executable, "-m", "segdepth"]
