"""A host joining a hive across hosts (`hive-c0re serve --swarm`): the parts, in order."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hyperhive.core.agents import Registry
from hyperhive.core.broker import EventHub
from hyperhive.core.config import DaemonConfig
from hyperhive.core.store import Store, set_id_floor
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, Unavailable
from hyperhive.swarm import subjects as s
from hyperhive.swarm.broker import JetStreamBroker
from hyperhive.swarm.directory import Directory
from hyperhive.swarm.forward import Forwarder
from hyperhive.swarm.link import Link

log = logging.getLogger(__name__)


@dataclass
class Swarm:
    link: Link
    broker: JetStreamBroker
    directory: Directory
    forward: Forwarder


START_RETRY = 60.0
"""How long a starting host waits for JetStream to take its set-up."""


def check_credentials(path: Path) -> None:
    """The credentials are a regular file of this user's that nobody else can read."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise BadParams(f"--swarm-credentials {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadParams(f"--swarm-credentials {path} is not a regular file")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise BadParams(
            f"--swarm-credentials {path} must be owned by uid {os.geteuid()} and readable by"
            f" it alone (chmod 600): it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
        )


def replicas(cfg: DaemonConfig) -> int:
    if cfg.swarm_replicas:
        return cfg.swarm_replicas
    return 3 if len(cfg.swarm) >= 3 else 1


async def open_swarm(
    cfg: DaemonConfig, nursery: trio.Nursery, store: Store, hub: EventHub, registry: Registry
) -> Swarm:
    """Start the NATS sidecar, make sure the hive's streams and buckets exist, take this
    host's id range, then the directory (who runs where) and the JetStream broker."""
    if cfg.swarm_credentials is not None:
        await trio.to_thread.run_sync(check_credentials, cfg.swarm_credentials)
    else:
        log.warning(
            "swarm: no --swarm-credentials: anyone who reaches a NATS server can act as the"
            " operator of this hive (SPEC §11)"
        )
    link = Link(list(cfg.swarm), cfg.host_name, cfg.swarm_credentials)
    with trio.move_on_after(60) as waited:
        await nursery.start(link.serve)
    if waited.cancelled_caught:
        raise Unavailable(f"no NATS server answered at {', '.join(cfg.swarm)}")
    await _retry(link, "setup", replicas=replicas(cfg))
    slot = await _claim_slot(link, cfg.host_name)
    await store.run(set_id_floor, slot * s.ID_SPAN)
    registry.host = cfg.host_name
    directory = Directory(link, registry, hub, cfg.host_name)
    directory.slot = slot
    registry.remote = directory
    await nursery.start(directory.serve)
    broker = JetStreamBroker(
        link, store, hub, registry.resolve, host=cfg.host_name, max_attempts=cfg.max_attempts
    )
    log.info("swarm: host %s (ids from %d) on %s", cfg.host_name, slot * s.ID_SPAN, cfg.swarm)
    forward = Forwarder(link, directory, cfg.host_name, slot)
    broker.share, forward.messages = trio.open_memory_channel[wire.HiveEvent](10_000)
    broker.share_wanted = directory.watched
    return Swarm(link, broker, directory, forward)


async def _retry(link: Link, op: str, **fields: Any) -> dict[str, Any]:
    """At start: the cluster may still be electing its leaders."""
    return await link.retrying(op, within=START_RETRY, **fields)


async def _claim_slot(link: Link, host: str) -> int:
    """This host's slot: kept from before, or the first free one (claimed with a create)."""
    got = await _retry(link, "kv_get", bucket=s.SLOTS_BUCKET, key=f"host.{host}")
    if got.get("value"):
        return int(str(got["value"]))
    for slot in range(1, 10_000):
        ans = await _retry(
            link, "kv_put", bucket=s.SLOTS_BUCKET, key=f"slot.{slot}", value=host, create=True
        )
        if ans.get("exists"):
            owner = await _retry(link, "kv_get", bucket=s.SLOTS_BUCKET, key=f"slot.{slot}")
            if owner.get("value") != host:
                continue
        await _retry(link, "kv_put", bucket=s.SLOTS_BUCKET, key=f"host.{host}", value=str(slot))
        return slot
    raise Unavailable("no free host slot in the hive")
