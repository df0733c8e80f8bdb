"""Bounded fan-out: one channel per subscriber, and a subscriber that falls behind is dropped."""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class FanOut(Generic[T]):
    """Hands each item to every subscriber without waiting: a subscriber whose channel is full
    (or whose receiving end is gone) is dropped, its channel closed, never waited on."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self._subs: set[trio.MemorySendChannel[T]] = set()

    def subscribe(self) -> trio.MemoryReceiveChannel[T]:
        """A channel of everything sent from now on; closed by the fan-out if it falls behind."""
        send, recv = trio.open_memory_channel[T](self.buffer)
        self._subs.add(send)
        return recv

    def send_nowait(self, item: T) -> None:
        for chan in list(self._subs):
            try:
                chan.send_nowait(item)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self._subs.discard(chan)
                chan.close()

    def __len__(self) -> int:
        return len(self._subs)
