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
        self._subs: dict[trio.MemorySendChannel[T], tuple[type, ...] | None] = {}

    def subscribe(self, kinds: tuple[type, ...] | None = None) -> trio.MemoryReceiveChannel[T]:
        """A channel of everything sent from now on (only instances of `kinds`, when given: a
        subscriber is never woken for what it ignores); closed by the fan-out if it falls
        behind."""
        send, recv = trio.open_memory_channel[T](self.buffer)
        self._subs[send] = kinds
        return recv

    def wants(self, kind: type) -> bool:
        """Whether any subscriber would take an item of `kind` (so it is worth making)."""
        return any(kinds is None or issubclass(kind, kinds) for kinds in self._subs.values())

    def send_nowait(self, item: T) -> None:
        for chan, kinds in list(self._subs.items()):
            if kinds is not None and not isinstance(item, kinds):
                continue
            try:
                chan.send_nowait(item)
            except (trio.WouldBlock, trio.BrokenResourceError):
                del self._subs[chan]
                chan.close()

    def __len__(self) -> int:
        return len(self._subs)
