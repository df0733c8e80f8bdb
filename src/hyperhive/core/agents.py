"""The registry of agents: who exists, their role, port and desired state, kept in sqlite."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, get_args

import trio

from hyperhive.core.broker import EventHub
from hyperhive.core.store import Store
from hyperhive.protocol import wire
from hyperhive.protocol.errors import Conflict, Internal, NotFound
from hyperhive.protocol.names import (
    BROADCAST,
    MANAGER,
    MANAGER_NAME,
    OPERATOR,
    canonical_recipient,
)

if TYPE_CHECKING:
    from hyperhive.core.meta import Pin

PORT_SPAN = 900
STALL_SECONDS = 600.0
"""A turn without end, or unread messages while idle, for this long: `stalled`."""


def day_start(now: float) -> float:
    """Midnight UTC of the day `now` is in (what `cost_today` and `stats` call today)."""
    return now - now % 86_400.0


_LIVE: frozenset[wire.ContainerState] = frozenset(get_args(wire.ContainerState)) - {"destroyed"}
TRANSITIONS: dict[wire.ContainerState, frozenset[wire.ContainerState]] = {
    "spawning": frozenset({"stopped"}),
    "starting": frozenset({"stopped", "spawning", "crashed", "restarting", "rebuilding"}),
    "running": frozenset({"starting"}),
    "crashed": frozenset({"starting", "running"}),
    "stopping": _LIVE,
    "stopped": _LIVE,
    "restarting": _LIVE,
    "rebuilding": _LIVE,
    "destroying": _LIVE,
    "destroyed": _LIVE,
}
"""The state table of SPEC §4.4: for each state, the states it may be entered from (staying in a
state is always allowed). `destroyed` is left only by reviving (`Registry.add`)."""


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass
class AgentRecord:
    name: str
    role: wire.AgentRole
    port: int
    created_at: float
    desired: str = "running"
    destroyed_at: float | None = None
    state: wire.ContainerState = "stopped"
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    limits_note: str | None = None
    built_rev: str | None = None
    """The hyperhive revision the running container was started from."""
    built_closure: str | None = None
    """nixos: the system closure its container was last built to (the per-container profile)."""
    built_lock: str | None = None
    """nixos: the meta flake's locked hyperhive input it was last built from (rev or narHash)."""
    port_conflict: bool = False
    network: str | None = None
    """Its network as last started (see wire.AgentInfo.network)."""
    turn_state: wire.TurnState | None = None
    """What its harness last reported doing (`report_state`), and since when."""
    turn_since: float | None = None
    last_turn_at: float | None = None
    cost_today: float = 0.0
    cost_day: float = 0.0
    turn_failures: int = 0
    next_turns: int = 0
    waiting_on: tuple[str, ...] = ()
    """Whom it waits on for an answer: `operator` (its question, or an approval it asked for)
    or peers it asked (core/attention.py keeps it current)."""
    waiting_since: float | None = None
    """`next_turn`s in a row since it last received a message from someone else."""
    """Turns in a row that failed (outcome `error`) since its last good one: a deploy's health."""
    """The day (its midnight UTC) `cost_today` adds up."""

    @property
    def container(self) -> str:
        return MANAGER_NAME if self.role == "manager" else f"h-{self.name}"

    @property
    def recipient(self) -> str:
        """The broker inbox of this agent."""
        return MANAGER if self.role == "manager" else self.name

    @property
    def alive(self) -> bool:
        return self.destroyed_at is None


def attention_of(
    rec: AgentRecord, unread: int, needs_login: bool, now: float
) -> tuple[wire.AttentionState, float | None, str]:
    """What the agent needs (SPEC §4.4), the first that holds: crash-looping, stopped, needs
    login, rate limited, compacting, waiting on the operator, waiting on an agent, stalled,
    working, idle. Returns (state, since, detail)."""
    if rec.state == "crashed":
        return "crash_looping", None, rec.last_error or ""
    if rec.state != "running":
        return "stopped", None, rec.state
    turn, since = rec.turn_state, rec.turn_since
    if needs_login or turn == "needs_login":
        return "needs_login", since, ""
    if turn == "rate_limited":
        return "rate_limited", since, ""
    if turn == "compacting":
        return "compacting", since, ""
    if "operator" in rec.waiting_on:
        return "waiting_on_operator", rec.waiting_since, "operator"
    if rec.waiting_on:
        return "waiting_on_agent", rec.waiting_since, ", ".join(rec.waiting_on)
    age = 0.0 if since is None else now - since
    stuck = age >= STALL_SECONDS
    if turn == "thinking":
        if stuck:
            return "stalled", since, f"in a turn for {int(age // 60)} min"
        return "working", since, ""
    if stuck and unread:
        return "stalled", since, f"{unread} unread while idle"
    return "idle", since, ""


_Row = tuple[str, str, int, float, str, float | None, str | None, str | None, str | None]


def _load(conn: sqlite3.Connection) -> list[_Row]:
    return conn.execute(
        "SELECT name, role, port, created_at, desired, destroyed_at, built_rev, built_closure,"
        " built_lock FROM agents ORDER BY name"
    ).fetchall()


def _upsert(conn: sqlite3.Connection, rec: AgentRecord) -> None:
    conn.execute(
        "INSERT INTO agents (name, role, created_at, port, desired, destroyed_at, built_rev,"
        " built_closure, built_lock) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO"
        " UPDATE SET role = excluded.role, port = excluded.port, desired = excluded.desired,"
        " destroyed_at = excluded.destroyed_at, built_rev = excluded.built_rev,"
        " built_closure = excluded.built_closure, built_lock = excluded.built_lock",
        (
            rec.name,
            rec.role,
            rec.created_at,
            rec.port,
            rec.desired,
            rec.destroyed_at,
            rec.built_rev,
            rec.built_closure,
            rec.built_lock,
        ),
    )


def _delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM agents WHERE name = ?", (name,))


class RemoteAgents(Protocol):
    """The agents of the other hosts of a swarm hive (hyperhive.swarm.directory.Directory)."""

    def infos(self) -> list[wire.AgentInfo]: ...

    def names(self) -> list[str]: ...

    def host_of(self, name: str) -> str | None: ...

    async def claim(self, name: str) -> None: ...


class Registry:
    def __init__(self, store: Store, hub: EventHub, *, ui_port_base: int, backend: str) -> None:
        self._store = store
        self._hub = hub
        self._base = ui_port_base
        self._backend = backend
        self._agents: dict[str, AgentRecord] = {}
        self.login_check: dict[str, bool] = {}
        self.deployed: dict[str, str] = {}
        """Each agent's pin in the meta repo (`tag sha12`), kept current by `set_deployed`."""
        self.revision: str | None = None
        """The hyperhive revision new containers start from (see core/revision.py)."""
        self.host: str | None = None
        self.remote: RemoteAgents | None = None
        """Swarm mode: the agents of the other hosts (hyperhive.swarm.directory)."""

    async def load(self) -> None:
        for row in await self._store.run(_load):
            name, role, port, created, desired, destroyed, built, closure, lock = row
            assert role in ("agent", "manager")
            self._agents[name] = AgentRecord(
                name=name,
                role=role,  # type: ignore[arg-type]
                port=port,
                created_at=created,
                desired=desired,
                destroyed_at=destroyed,
                state="destroyed" if destroyed is not None else "stopped",
                built_rev=built,
                built_closure=closure,
                built_lock=lock,
            )

    def get(self, name: str) -> AgentRecord:
        rec = self._agents.get(name)
        if rec is None:
            raise NotFound(f"no agent named {name!r}")
        return rec

    def find(self, name: str) -> AgentRecord | None:
        return self._agents.get(name)

    def live(self, name: str) -> AgentRecord:
        rec = self.get(name)
        if not rec.alive:
            raise Conflict(f"agent {name!r} is destroyed (its state is kept; spawn it to revive)")
        return rec

    def all(self) -> list[AgentRecord]:
        return sorted(self._agents.values(), key=lambda r: (r.role != "manager", r.name))

    def live_names(self) -> list[str]:
        return [r.name for r in self.all() if r.alive]

    def _allocate_port(self, name: str, role: wire.AgentRole) -> int:
        if role == "manager":
            return self._base
        taken = {r.port for r in self._agents.values() if r.name != name}
        start = fnv1a_32(name.encode()) % PORT_SPAN
        for i in range(PORT_SPAN):
            port = self._base + 100 + (start + i) % PORT_SPAN
            if port not in taken:
                return port
        raise Conflict("no free web UI port left in the agent range")

    async def add(self, name: str, role: wire.AgentRole) -> AgentRecord:
        """Register a new agent, or revive a destroyed one keeping its port."""
        rec = self._agents.get(name)
        if rec is not None and rec.alive:
            raise Conflict(f"agent {name!r} already exists")
        if self.remote is not None:
            await self.remote.claim(name)
        new = rec is None
        if rec is None:
            rec = AgentRecord(
                name=name, role=role, port=self._allocate_port(name, role), created_at=time.time()
            )
            # Held at once, before the write below yields: a spawn running meanwhile must see
            # this port as taken (two agents were given one port under concurrent spawns).
            self._agents[name] = rec
        rec.destroyed_at = None
        rec.desired = "running"
        rec.state = "stopped"
        try:
            await self._store.run(_upsert, rec)
        except BaseException:
            if new:
                self._agents.pop(name, None)
            raise
        self._agents[name] = rec
        self.changed(rec)
        return rec

    async def save(self, rec: AgentRecord) -> None:
        await self._store.run(_upsert, rec)
        self.changed(rec)

    async def forget(self, name: str) -> None:
        await self._store.run(_delete, name)
        self._agents.pop(name, None)
        self._hub.publish(lambda seq: wire.AgentRemoved(seq=seq, name=name))

    def move(self, rec: AgentRecord, state: wire.ContainerState, **fields: object) -> None:
        """The one way an agent's state changes: checked against `TRANSITIONS` (a move the
        table does not allow is a bug, `Internal`), with the fields that go with it."""
        if state != rec.state and rec.state not in TRANSITIONS[state]:
            raise Internal(f"{rec.name}: no transition from {rec.state} to {state}")
        rec.state = state
        self.note(rec, **fields)

    def note(self, rec: AgentRecord, **fields: object) -> None:
        """What was observed of an agent (error, pid, network, port conflict...), state kept."""
        self.note_quietly(rec, **fields)
        self.changed(rec)

    def note_quietly(self, rec: AgentRecord, **fields: object) -> None:
        """As `note`, but subscribers see it with the agent's next change."""
        for key, value in fields.items():
            if key in ("state", "desired", "destroyed_at") or not hasattr(rec, key):
                raise Internal(f"{key!r} is not an observation of an agent")
            setattr(rec, key, value)

    async def set_desired(self, rec: AgentRecord, desired: str) -> None:
        """Whether the agent should run (kept across daemon restarts)."""
        rec.desired = desired
        await self.save(rec)

    async def bury(self, rec: AgentRecord, note: str | None = None) -> None:
        """The agent is destroyed (a tombstone: its state is kept until purged)."""
        self.move(rec, "destroyed", **({} if note is None else {"last_error": note}))
        rec.desired = "stopped"
        rec.destroyed_at = time.time()
        await self.save(rec)

    def info(self, rec: AgentRecord, unread: int = 0) -> wire.AgentInfo:
        needs_login = self.login_check.get(rec.name, False)
        attention, since, detail = attention_of(rec, unread, needs_login, time.time())
        return wire.AgentInfo(
            attention=attention,
            attention_since=since,
            attention_detail=detail,
            name=rec.name,
            role=rec.role,
            container=rec.container,
            state=rec.state,
            backend=self._backend,
            port=rec.port,
            needs_login=needs_login,
            pid=rec.pid,
            restarts=rec.restarts,
            unread=unread,
            last_error=rec.last_error,
            limits_note=rec.limits_note,
            port_conflict=rec.port_conflict,
            deployed=self.deployed.get(rec.name),
            network=rec.network,
            turn_state=rec.turn_state,
            turn_since=rec.turn_since,
            last_turn_at=rec.last_turn_at,
            cost_today=rec.cost_today if rec.cost_day == day_start(time.time()) else 0.0,
            needs_update=self.stale(rec) and rec.state == "running",
            built_rev=rec.built_rev,
            built_closure=rec.built_closure,
            built_lock=rec.built_lock,
            host=self.host,
        )

    def stale(self, rec: AgentRecord) -> bool:
        """Its container was built from (or started with) another hyperhive than the daemon's."""
        return rec.alive and self.revision is not None and rec.built_rev != self.revision

    def infos(self, queued: Callable[[str], int]) -> list[wire.AgentInfo]:
        """Every agent's info, its unread count from `queued` (the broker's in-memory depths)."""
        local = [self.info(r, unread=queued(r.recipient)) for r in self.all()]
        return local if self.remote is None else local + self.remote.infos()

    def set_deployed(self, pins: Mapping[str, Pin]) -> None:
        """The meta repo's committed pins changed: agents whose pin moved are `changed`."""
        now = {name: f"{pin.tag} {pin.rev[:12]}" for name, pin in pins.items()}
        moved = {n for n in now.keys() | self.deployed.keys() if now.get(n) != self.deployed.get(n)}
        self.deployed = now
        for name in sorted(moved):
            rec = self._agents.get(name)
            if rec is not None:
                self.changed(rec)

    def changed(self, rec: AgentRecord, unread: int = 0) -> None:
        info = self.info(rec, unread)
        self._hub.publish(lambda seq: wire.AgentChanged(seq=seq, agent=info))

    def resolve(self, to: str, sender: str) -> list[str]:
        """The broker's recipient resolution (see `Broker`)."""
        to = canonical_recipient(to)
        if to in (OPERATOR, MANAGER):
            return [to]
        if to == BROADCAST:
            local = [r.recipient for r in self.all() if r.alive and r.recipient != sender]
            others = [] if self.remote is None else self.remote.names()
            return local + sorted(n for n in others if n != sender and n not in local)
        rec = self._agents.get(to)
        remote = self.remote
        if (rec is None or not rec.alive) and remote is not None and remote.host_of(to):
            return [to]
        if rec is None or not rec.alive:
            raise NotFound(
                f"unknown recipient {to[:40]!r}: send to an agent name, 'manager',"
                " 'operator' or '*'"
            )
        return [rec.recipient]


Verdict = Callable[[], tuple[bool, str | None]]
"""(decided, why): whether an agent under watch is judged yet, and the reason if it failed."""


async def watch_agent(
    events: AsyncGenerator[wire.HiveEvent, None],
    rec: AgentRecord,
    verdict: Verdict,
    window: float,
) -> tuple[bool, str | None]:
    """Ask `verdict` now and after each change of `rec` (`events`: the hub's agent events), for
    at most `window` seconds: what it decides, or (False, None) when the window runs out. An
    agent destroyed or removed meanwhile is decided, with no reason (a deploy's or an upgrade's
    health watch)."""
    with trio.move_on_after(window):
        async with aclosing(events) as stream:
            decided = verdict()
            if decided[0]:
                return decided
            async for event in stream:
                if isinstance(event, wire.AgentRemoved) and event.name == rec.name:
                    return True, None
                if isinstance(event, wire.AgentChanged) and event.agent.name == rec.name:
                    if not rec.alive:
                        return True, None
                    decided = verdict()
                    if decided[0]:
                        return decided
    return False, None
