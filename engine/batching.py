"""Camera-rate batching: a bounded queue between the receiving thread and the inference loop.

The receiver :meth:`FrameQueue.put`\\ s frames (and end-of-stream markers); the inference loop
takes a batch with :meth:`FrameQueue.take_batch`: up to ``max_batch`` frames, or whatever
arrived within ``max_wait_s`` of the first one, whichever comes first. A batch holds frames of
one session and one shape only.

Overload policy, per item: ``live`` -- the queue never grows past ``capacity``: the oldest
waiting frame is dropped (counted in ``skipped``) so the newest are served; ``replay`` -- ``put``
waits for room, which stops the receiver and so back-pressures the sender (nothing is lost).
End-of-stream markers are never dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Item:
    """A queued frame (``frame`` is not None) or control marker, with its receipt time.

    ``key`` (session, shape) groups frames that may share a batch; ``t_recv`` is
    ``time.monotonic()`` at receipt.
    """

    payload: Any
    key: tuple
    t_recv: float
    is_frame: bool = True


class FrameQueue:
    """Bounded, thread-safe queue with the live/replay overload policies (module docstring)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.skipped = 0
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Wake every waiter; later puts are refused and takes return what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def put(self, item: Item, live: bool) -> bool:
        """Queue ``item``; False only if the queue was closed while waiting (replay)."""
        with self._cond:
            if live or not item.is_frame:
                while item.is_frame and self._frames() >= self.capacity:
                    self._drop_oldest_frame()
            else:
                while not self._closed and len(self._items) >= self.capacity:
                    self._cond.wait(0.1)
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take_batch(
        self,
        max_batch: int,
        max_wait_s: float,
        idle_timeout_s: float = 0.1,
        max_pixels: int | None = None,
    ) -> list[Item]:
        """Up to ``max_batch`` frames of one key (and, given ``max_pixels``, at most that many
        pixels in all, but always one frame), or a single control item; [] after
        ``idle_timeout_s`` with nothing queued (or when closed and empty)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(idle_timeout_s)
            if not self._items:
                return []
            first = self._items[0]
            if not first.is_frame:
                self._items.popleft()
                self._cond.notify_all()
                return [first]
            deadline = first.t_recv + max_wait_s
            if max_pixels is not None:
                max_batch = max(1, min(max_batch, max_pixels // _pixels(first.key)))
            batch: list[Item] = []
            while len(batch) < max_batch:
                if self._items:
                    head = self._items[0]
                    if not head.is_frame or head.key != first.key:
                        break
                    batch.append(self._items.popleft())
                    self._cond.notify_all()
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _frames(self) -> int:
        return sum(1 for it in self._items if it.is_frame)

    def _drop_oldest_frame(self) -> None:
        for i, it in enumerate(self._items):
            if it.is_frame:
                del self._items[i]
                self.skipped += 1
                return


def _pixels(key: tuple) -> int:
    """Pixels of a frame from its batching key (session, shape)."""
    shape = key[1]
    return int(shape[0]) * int(shape[1])
