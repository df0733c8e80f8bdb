"""The hive across hosts: who runs where, and which hosts are up (KV buckets on JetStream).

Each daemon writes only its own: its agents' records under their names in `hive_agents` (the
name claimed with a create, so two hosts cannot both have an agent `alice`), its heartbeat in
`hive_hosts`. It watches both buckets, so `list` on any host shows every agent with its host,
and an agent whose host's heartbeat stopped shows `host_down` (never silently gone). Remote
changes are republished on the local event hub, so every dashboard follows the whole hive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import NoReturn

import msgspec
import trio

from hyperhive.core.agents import Registry
from hyperhive.core.broker import EventHub
from hyperhive.protocol import wire
from hyperhive.protocol.errors import Conflict, HiveError
from hyperhive.protocol.names import MANAGER
from hyperhive.swarm import subjects as s
from hyperhive.swarm.link import Link, SwarmError

log = logging.getLogger(__name__)

_info = msgspec.json.Decoder(wire.AgentInfo)
_encode = msgspec.json.Encoder().encode


def _changed(info: wire.AgentInfo, seq: int) -> wire.HiveEvent:
    return wire.AgentChanged(seq=seq, agent=info)


class Heartbeat(msgspec.Struct, frozen=True):
    at: float
    slot: int = 0
    agents: int = 0
    mem_available: int = 0
    """Bytes (/proc/meminfo MemAvailable): where the placement policy puts a new agent."""
    watching: bool = False
    """A console there follows the message flow: the other hosts share their message events."""


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Directory:
    def __init__(self, link: Link, registry: Registry, hub: EventHub, host: str) -> None:
        self._link = link
        self._registry = registry
        self._hub = hub
        self.host = host
        self.remote: dict[str, wire.AgentInfo] = {}
        """Agents of the other hosts, as their hosts last wrote them."""
        self.beats: dict[str, float] = {}
        """Each host's last heartbeat (its wall clock: hosts keep time with NTP)."""
        self.heartbeats: dict[str, Heartbeat] = {}
        self.slot = 0
        self._down: set[str] = set()
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self.ready = trio.Event()

    # ------------------------------------------------------------------ what the daemon asks

    def host_of(self, name: str) -> str | None:
        """The host of a remote agent (None: local or unknown)."""
        info = self.remote.get(name)
        return None if info is None or info.state == "destroyed" else info.host

    def is_down(self, host: str) -> bool:
        return time.time() - self.beats.get(host, 0.0) > s.HOST_TTL

    def live_hosts(self) -> list[str]:
        return sorted(h for h in self.beats if not self.is_down(h))

    def watched(self) -> bool:
        """Whether a console on another live host follows the message flow."""
        return any(
            b.watching and h != self.host and not self.is_down(h)
            for h, b in self.heartbeats.items()
        )

    def slot_host(self, slot: int) -> str | None:
        for host, beat in self.heartbeats.items():
            if beat.slot == slot:
                return host
        return None

    def placement(self) -> str | None:
        """The live host with the most available memory, then the fewest agents, then by name."""
        live = [(h, b) for h, b in self.heartbeats.items() if not self.is_down(h)]
        if not live:
            return None
        live.sort(key=lambda hb: (-(hb[1].mem_available >> 26), hb[1].agents, hb[0]))
        return live[0][0]

    def infos(self) -> list[wire.AgentInfo]:
        out = []
        for info in self.remote.values():
            if info.host is None or info.host == self.host:
                continue
            down = self.is_down(info.host)
            out.append(msgspec.structs.replace(info, host_down=down))
        return sorted(out, key=lambda i: (i.role != "manager", i.name))

    def names(self) -> list[str]:
        """The live agents of the other hosts."""
        return [
            MANAGER if i.role == "manager" else n
            for n, i in self.remote.items()
            if i.host != self.host and i.state != "destroyed"
        ]

    async def claim(self, name: str) -> None:
        """Take `name` hive-wide before an agent of that name is created here."""
        owner = self.host_of(name)
        if owner is not None and owner != self.host:
            raise Conflict(f"agent {name!r} already exists on host {owner}")
        try:
            ans = await self._link.call(
                "kv_put",
                bucket=s.AGENTS_BUCKET,
                key=name,
                value=self._placeholder(name),
                create=True,
            )
        except SwarmError as exc:
            raise HiveError(f"swarm: could not claim the name {name!r}: {exc.message}") from None
        if ans.get("exists"):
            got = await self._link.call("kv_get", bucket=s.AGENTS_BUCKET, key=name)
            if got.get("value"):
                info = _info.decode(got["value"])
                if info.host not in (None, self.host) and info.state != "destroyed":
                    raise Conflict(f"agent {name!r} already exists on host {info.host}")

    def _placeholder(self, name: str) -> str:
        return _encode(
            wire.AgentInfo(
                name=name,
                role="agent",
                container=f"h-{name}",
                state="stopped",
                backend="",
                port=0,
                host=self.host,
            )
        ).decode()

    # ------------------------------------------------------------------ the service

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._beat)
            nursery.start_soon(self._watch, s.HOSTS_BUCKET, self._on_host)
            nursery.start_soon(self._watch, s.AGENTS_BUCKET, self._on_agent)
            nursery.start_soon(self._publish_local)
            nursery.start_soon(self._watch_down)
            with trio.move_on_after(10):
                await self.ready.wait()
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def _beat(self) -> NoReturn:
        watching = False
        while True:
            beat = Heartbeat(
                at=time.time(),
                slot=self.slot,
                agents=len(self._registry.live_names()),
                mem_available=await trio.to_thread.run_sync(mem_available),
                watching=self._hub.wants(wire.MessageSent),
            )
            try:
                await self._link.call(
                    "kv_put", bucket=s.HOSTS_BUCKET, key=self.host, value=_encode(beat).decode()
                )
            except SwarmError as exc:
                log.warning("swarm heartbeat failed: %s", exc.message)
            # The next beat, or at once when a console starts or stops following the flow
            # (the other hosts share their message events only while one does).
            with trio.move_on_after(s.HEARTBEAT):
                while self._hub.wants(wire.MessageSent) == watching:
                    await self._hub.subscribed.wait()
            watching = self._hub.wants(wire.MessageSent)

    async def _watch(self, bucket: str, apply: Callable[[str, str | None], None]) -> NoReturn:
        while True:
            try:
                await self._link.wait_up()
                async with self._link.subscribe("kv_watch", bucket=bucket) as pushes:
                    async for push in pushes:
                        if push.get("ready"):
                            if bucket == s.AGENTS_BUCKET:
                                self.ready.set()
                            continue
                        apply(str(push["key"]), push.get("value"))
            except SwarmError as exc:
                log.warning("swarm watch of %s ended: %s", bucket, exc.message)
            await trio.sleep(0.5)

    def _on_host(self, host: str, value: str | None) -> None:
        if value is None:
            self.beats.pop(host, None)
            self.heartbeats.pop(host, None)
        else:
            try:
                beat = msgspec.json.decode(value, type=Heartbeat)
            except msgspec.DecodeError as exc:
                log.warning("swarm: unreadable heartbeat of %s: %s", host, exc)
                return
            self.beats[host] = beat.at
            self.heartbeats[host] = beat
        self._flip(host)

    def _on_agent(self, name: str, value: str | None) -> None:
        if value is None:
            gone = self.remote.pop(name, None)
            if gone is not None and gone.host != self.host:
                self._hub.publish(lambda seq: wire.AgentRemoved(seq=seq, name=name))
            return
        try:
            info = _info.decode(value)
        except msgspec.DecodeError as exc:  # malformed or not an AgentInfo: nobody's record
            log.warning("swarm: unreadable record of %s: %s", name, exc)
            return
        self.remote[name] = info
        if info.host != self.host and info.backend:
            shown = msgspec.structs.replace(info, host_down=self.is_down(info.host or ""))
            self._hub.publish(partial(_changed, shown))

    def _flip(self, host: str) -> None:
        down = self.is_down(host)
        if down == (host in self._down):
            return
        if down:
            self._down.add(host)
            log.warning("swarm: host %s is down", host)
        else:
            self._down.discard(host)
            log.info("swarm: host %s is up", host)
        for info in self.remote.values():
            if info.host == host and host != self.host:
                shown = msgspec.structs.replace(info, host_down=down)
                self._hub.publish(partial(_changed, shown))

    async def _watch_down(self) -> NoReturn:
        while True:
            await trio.sleep(1.0)
            for host in list(self.beats):
                self._flip(host)

    async def _publish_local(self) -> NoReturn:
        """This host's agents into `hive_agents`, coalesced (a record per agent, its latest)."""
        recv = self._hub.subscribe((wire.AgentChanged, wire.AgentRemoved))
        for rec in self._registry.all():
            self._dirty.add(rec.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            with recv:
                async for event in recv:
                    if isinstance(event, wire.AgentChanged):
                        if event.agent.host == self.host:
                            self._dirty.add(event.agent.name)
                            self._wake.set()
                    elif isinstance(event, wire.AgentRemoved) and self._mine(event.name):
                        self._dirty.add(event.name)
                        self._wake.set()
        raise AssertionError("the event hub dropped the swarm directory")

    def _mine(self, name: str) -> bool:
        """An agent removed here that was this host's."""
        return self._registry.find(name) is None and self.host_of(name) in (None, self.host)

    async def _flush_loop(self) -> NoReturn:
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0.05)  # gather a burst of changes into one write per agent
            dirty, self._dirty = self._dirty, set()
            for name in sorted(dirty):
                try:
                    await self._write(name)
                except SwarmError as exc:
                    log.warning("swarm: could not publish %s: %s", name, exc.message)
                    self._dirty.add(name)
            if self._dirty:
                await trio.sleep(1.0)
                self._wake.set()

    async def _write(self, name: str) -> None:
        rec = self._registry.find(name)
        if rec is None:
            await self._link.call("kv_delete", bucket=s.AGENTS_BUCKET, key=name)
            return
        info = self._registry.info(rec)
        await self._link.call(
            "kv_put", bucket=s.AGENTS_BUCKET, key=name, value=_encode(info).decode()
        )


__all__ = ["Directory"]
