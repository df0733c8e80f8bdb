"""The swarm's names on NATS: subjects, streams, buckets and their limits (SPEC §11)."""

from __future__ import annotations

INBOX = "hive.inbox"
"""`hive.inbox.<recipient>`: one subject per inbox in the work-queue stream."""
INBOX_STREAM = "HIVE_INBOX"
DEAD = "hive.dead"
"""`hive.dead.<id>`: a dead letter, kept under the id it had (requeue finds it by subject)."""
DEAD_STREAM = "HIVE_DEAD"
OPERATOR_SUBJECT = "hive.operator"
OPERATOR_STREAM = "HIVE_OPERATOR"
AGENTS_BUCKET = "hive_agents"
"""agent name -> its record (host, role, state, port...): the hive-wide directory."""
SLOTS_BUCKET = "hive_slots"
"""`slot.<n>` -> host and `host.<name>` -> n: each host's range of approval, question and
reminder ids (`n * ID_SPAN` up), so an id names its host hive-wide."""
ID_SPAN = 1_000_000_000
HOSTS_BUCKET = "hive_hosts"
"""host name -> its heartbeat; a key gone (TTL) is a host down."""
EVENTS = "hive.events"
"""`hive.events.<host>`: a host's approval and question events, live, for every console."""
ADMIN = "hive.host"
"""`hive.host.<host>.admin`: operator requests forwarded to the host that owns the agent."""

DEDUPE_WINDOW = 120.0
"""Seconds JetStream remembers a `Nats-Msg-Id`: a publish retried within it is stored once."""
HOST_TTL = 6.0
"""A host whose heartbeat is older than this is down."""
HEARTBEAT = 1.5
ACK_WAIT = 10.0
"""JetStream's lease: the daemon renews each lease it holds (+WPI) well within this. Also how
long an inbox waits for a delivery lost on its way (see JetStreamBroker._reconcile)."""
RENEW = 3.0
KEEP_DAYS = 30.0
MAX_ACK_PENDING = 10_000
MAX_PAYLOAD = 2 * 1024 * 1024
MAX_LINE = 8 * 1024 * 1024
API_TIMEOUT = 5.0
PUBLISH_RETRY = 30.0
"""How long a send keeps retrying its publish (same message id: stored once) through a NATS
node failing over, before the sender is told it failed."""


def inbox(recipient: str) -> str:
    return f"{INBOX}.{recipient}"


def durable(recipient: str) -> str:
    return f"in-{recipient}"


def admin(host: str) -> str:
    return f"{ADMIN}.{host}.admin"


def peer(host: str) -> str:
    """Agents' answers to the questions that live on `host`."""
    return f"{ADMIN}.{host}.peer"
