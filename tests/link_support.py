"""A raw sender for wire probes: binds like an Output but sends whatever parts it is given,
wrapped in the link framing (docs/PROTOCOL.md "Link"), to the one reader that said ready."""

from __future__ import annotations

import struct

import msgpack
import zmq


class RawLink:
    """ROUTER bound at ``endpoint``; :meth:`send` wraps ``parts`` as link message number n."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting reader keeps its id
        self.socket.bind(endpoint)
        self.peer: bytes | None = None
        self.seq = 0

    def wait_for_reader(self, timeout_s: float = 5.0) -> bytes:
        assert self.socket.poll(int(timeout_s * 1000)), "no reader said ready"
        self.peer = self.socket.recv_multipart()[0]
        self.socket.send_multipart(
            [self.peer, b"welcome", msgpack.packb({"v": 1, "sender": "raw"})]
        )
        return self.peer

    def send(self, parts: list) -> None:
        self.socket.send_multipart([self.peer, b"data", struct.pack("<Q", self.seq), *parts])
        self.seq += 1

    def send_unframed(self, parts: list) -> None:
        self.socket.send_multipart([self.peer, *parts])

    def close(self) -> None:
        self.socket.close(0)
