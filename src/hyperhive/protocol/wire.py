"""Wire types of every hyperhive socket: tagged msgspec Structs, one JSON object per line.

Requests carry their command in `cmd`; replies carry `ok` and, on failure, `code` and `error`.
Unknown fields are ignored on the wire so that newer clients keep working with older daemons.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar, get_args

import msgspec

# --------------------------------------------------------------------------- shared records

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""What sqlite can store: a larger number names no message, so it is refused at the edge."""
Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Wait = Annotated[float, msgspec.Meta(ge=0, le=86_400)]

AgentRole = Literal["agent", "manager"]
ContainerState = Literal[
    "stopped",
    "spawning",
    "starting",
    "running",
    "stopping",
    "restarting",
    "rebuilding",
    "crashed",
    "destroying",
    "destroyed",
]


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """A broker message as handed to a reader."""

    id: int
    sender: str = msgspec.field(name="from")
    to: str
    body: str
    sent_at: float
    attempt: int = 0
    """Which delivery attempt this is (1 for the first hand-out, 0 when only listed)."""
    redelivery: bool = False
    broadcast: bool = False
    state: str = "queued"
    origin: str = ""
    """The socket that accepted it (an agent, `operator`, `system`); differs from `from` only
    for `wake` labels, which an agent may put into its own inbox."""
    in_reply_to: int | None = None
    """The message this one answers (its thread), as its sender said."""


ForgeState = Literal["absent", "running", "failed"]
TurnState = Literal["idle", "thinking", "compacting", "rate_limited", "needs_login", "offline"]
"""What an agent's harness is doing (SPEC §6): reported by the harness itself. `rate_limited`:
the API refused a turn as rate limited or overloaded and the harness waits to retry it;
`needs_login`: no credentials, or the API refused them (401/403)."""
AttentionState = Literal[
    "working",
    "idle",
    "waiting_on_operator",
    "waiting_on_agent",
    "stalled",
    "needs_login",
    "rate_limited",
    "crash_looping",
    "compacting",
    "stopped",
]
"""What an agent needs, as the daemon derives it (SPEC §4.4): one badge per agent."""
TurnOutcome = Literal["ok", "error", "transient", "cancelled", "compacted", "abandoned"]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
UnixTime = Annotated[float, msgspec.Meta(ge=0, le=2**40)]


class TurnRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One finished turn of an agent (SPEC §6.2), as its harness reports it."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    """The harness's own id for the turn: a report sent twice is stored once."""
    started_at: UnixTime
    ended_at: UnixTime
    model: Annotated[str, msgspec.Meta(max_length=128)] = ""
    input_tokens: Count = 0
    output_tokens: Count = 0
    cache_read_tokens: Count = 0
    cache_write_tokens: Count = 0
    cost_usd: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    outcome: TurnOutcome = "ok"
    message_id: Count | None = None
    """The message that started it (None: a checkpoint or compaction of the harness's own)."""


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Turns and what they took, over some period."""

    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0


class AgentStats(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    last_turn: TurnRecord | None = None
    today: Usage = Usage()
    """Since midnight UTC."""
    week: Usage = Usage()
    """The last 7 days (168 hours)."""
    total: Usage = Usage()


class ForgeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The hive-forge container: a failure carries what went wrong and how to fix it."""

    state: ForgeState
    problem: str | None = None
    fix: str | None = None


ListenerState = Literal["serving", "waiting_for_port", "failed"]


class ListenerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A TCP port the daemon serves a web UI on (the dashboard), and why it does not, if not.

    `waiting_for_port`: the bind failed (the port is held, the address not yet there); the
    daemon retries with backoff. `failed`: it was bound but the server stopped with an error;
    restarted with the same backoff.
    """

    port: int
    """The port asked for; once serving, the one bound (they differ only when 0 was asked)."""
    state: ListenerState
    error: str | None = None
    """Why the latest attempt failed; kept once serving, to say what was waited for."""
    retry_at: float | None = None
    """Unix time of the next attempt, while not serving."""
    failed_attempts: int = 0
    """Failed attempts in a row: so far while not serving, before it came up once serving
    (0: it served at the first attempt)."""
    since: float | None = None
    """Unix time this state began (while waiting: the first of the failed attempts)."""
    waited: float = 0.0
    """Once serving: the seconds it waited before it came up."""


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: AgentRole
    container: str
    state: ContainerState
    backend: str
    port: int
    needs_login: bool = False
    needs_update: bool = False
    """The container runs an older hyperhive than the daemon's (adopted across an upgrade;
    nixos: built before it)."""
    built_rev: str | None = None
    """The hyperhive revision (core/revision.py) its container was built from or started with."""
    built_closure: str | None = None
    """nixos: the system closure its container was last built to."""
    built_lock: str | None = None
    """nixos: the meta flake's locked hyperhive input (rev or narHash) it was last built from."""
    pid: int | None = None
    restarts: int = 0
    unread: int = 0
    last_error: str | None = None
    limits_note: str | None = None
    """Set when a configured limit cannot be enforced by the backend (never pretend)."""
    port_conflict: bool = False
    """The agent's web UI port is held by a process outside the hive (it is not moved)."""
    deployed: str | None = None
    """What it runs, from the meta repo's pin: tag and commit, e.g. `deployed/7 1a2b3c4d5e6f`."""
    network: str | None = None
    """Its network as enforced (bwrap/nspawn, SPEC §4.1b): `open`, `anthropic`, `none` or
    `host`, with `+N` when its config allows N more host:port destinations; None: the
    backend's own (nixos) or not started yet."""
    turn_state: TurnState | None = None
    """What its harness reports doing (None: it has not reported since the daemon started)."""
    turn_since: float | None = None
    last_turn_at: float | None = None
    """When its last reported turn ended."""
    cost_today: float = 0.0
    """USD its turns cost since midnight UTC, as claude reports it."""
    attention: AttentionState = "stopped"
    attention_since: float | None = None
    attention_detail: str = ""
    """Whom it waits on (`operator`, an agent), or why it is stalled."""
    host: str | None = None
    """Swarm mode (SPEC §11): the host whose daemon runs it; None on a single-host hive."""
    host_down: bool = False
    """Swarm mode: its host's heartbeat stopped; the rest of this record is as that host last
    wrote it, and messages for it wait in JetStream until the host is back."""


# --------------------------------------------------------------------------- replies


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True


class Done(Reply, frozen=True):
    """A plain success."""


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = False
    code: str
    error: str


class AgentList(Reply, frozen=True):
    agents: list[AgentInfo]
    forge: ForgeStatus | None = None
    """The hive-forge's health when the daemon runs with a forge (`--forge-container`)."""
    dashboard: ListenerStatus | None = None
    """The dashboard's port, when the daemon runs a dashboard: serving, or waiting for it."""
    host: str | None = None
    """Swarm mode: the host that answered (its agents' UIs are the ones it can log you in to)."""


class AgentReply(Reply, frozen=True):
    agent: AgentInfo


class Sent(Reply, frozen=True):
    ids: list[int]
    """One durable message per recipient (several for a broadcast)."""
    recipients: list[str]


class Received(Reply, frozen=True):
    message: Message | None
    unread: int = 0
    """Messages still queued in the inbox after this one (the harness's wake prompt says how
    many wait, without a `status` round trip)."""


class Inbox(Reply, frozen=True):
    messages: list[Message]


class StatusReply(Reply, frozen=True):
    name: str
    role: AgentRole
    unread: int
    in_flight: int


class LogLines(Reply, frozen=True):
    name: str
    lines: list[str]


class Acked(Reply, frozen=True):
    acked: bool
    """False when the lease was not current (a late ack of a superseded attempt is ignored)."""


class Subscribed(Reply, frozen=True):
    subscribed: bool = True


ApprovalKind = Literal["apply_commit", "spawn", "flake_update"]
ApprovalStatus = Literal[
    "pending", "building", "spawning", "deployed", "failed", "denied", "rolled_back"
]


class ApprovalInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    agent: str
    kind: ApprovalKind
    status: ApprovalStatus
    requested_at: float
    commit_ref: str = ""
    sha: str = ""
    """The commit pinned as `proposal/<id>` (apply_commit only)."""
    description: str = ""
    resolved_at: float | None = None
    note: str = ""
    diff: str = ""
    """`git diff main..proposal/<id>` of the applied repo (in `pending` only; capped)."""


_INPUT = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
InputName = Annotated[str, msgspec.Meta(pattern=f"^{_INPUT}(/{_INPUT}){{0,3}}$")]
"""A flake input of the meta flake, or a path to an input of one of them (`hyperhive/nixpkgs`)."""


class MetaInput(msgspec.Struct, frozen=True, kw_only=True):
    """One input of the hive's meta flake as its flake.lock pins it (SPEC §4.4)."""

    name: str
    """`hyperhive`, `agent-alice`, or an input of an input: `hyperhive/nixpkgs`."""
    rev: str
    """The locked revision (12 hex digits), or the start of its narHash when it has none."""
    last_modified: float | None = None
    """Unix time of the locked revision (its commit's date)."""
    url: str = ""
    """Where it comes from (the flake reference it follows when updated)."""
    agents: list[str] = msgspec.field(default_factory=list)
    """The agents an update of it rebuilds."""


class MetaInputList(Reply, frozen=True):
    inputs: list[MetaInput]
    updatable: bool = False
    """Whether this hive's backend builds from the meta flake (nixos): only then can its
    inputs be updated (`request_flake_update`)."""


class ApprovalQueued(Reply, frozen=True):
    id: int
    sha: str = ""


class ApprovalList(Reply, frozen=True):
    approvals: list[ApprovalInfo]


class ApprovalReply(Reply, frozen=True):
    approval: ApprovalInfo


class QuestionInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    asker: str
    """The asker's inbox (`manager` for the manager)."""
    target: str | None
    """The peer's inbox it was routed to; None for the operator."""
    question: str
    options: list[str]
    multi: bool
    asked_at: float
    deadline_at: float
    answered_at: float | None = None
    answer: str | None = None
    answerer: str | None = None


class QuestionQueued(Reply, frozen=True):
    id: int


class QuestionList(Reply, frozen=True):
    questions: list[QuestionInfo]


class QuestionReply(Reply, frozen=True):
    question: QuestionInfo


class ReminderQueued(Reply, frozen=True):
    id: int
    due_at: float


class ReminderInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    due_at: float
    message: str
    """Its text (the first 500 characters)."""
    to: str = ""
    """Whose inbox it goes to (`manager` for the manager)."""


class ReminderList(Reply, frozen=True):
    reminders: list[ReminderInfo]


class TagInfo(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    """`proposal/<id>`, `approved/<id>`, `building/<id>`, `deployed/<id>`, `failed/<id>`, …"""
    sha: str
    at: float
    note: str = ""
    """The annotation (a failure's error, a denial's note), if the tag has one."""


class ConfigView(Reply, frozen=True):
    name: str
    agent_toml: str
    """agent.toml as deployed (the applied repo's `main`)."""
    agent_nix: str
    deployed: str | None
    tags: list[TagInfo]


class ConfigDiff(Reply, frozen=True):
    diff: str


class TagHistory(Reply, frozen=True):
    name: str
    tags: list[TagInfo]


class Threads(Reply, frozen=True):
    """What is still open that involves the caller (the manager: the whole hive)."""

    approvals: list[ApprovalInfo]
    questions: list[QuestionInfo]
    reminders: list[ReminderInfo]


class TurnsStored(Reply, frozen=True):
    ids: list[str]
    """The reported turns the daemon has (stored now or before): the harness forgets them."""


class MetricsText(Reply, frozen=True):
    text: str
    """Prometheus' text exposition format, as prometheus-client writes it."""


class StatsReply(Reply, frozen=True):
    agents: list[AgentStats]


class UiToken(Reply, frozen=True):
    token: str
    """The UI's token (`Authorization: Bearer` on its pages); the agent's own, no one else's."""


class ReplyEnvelope(msgspec.Struct, frozen=True):
    """What every reply has in common; decoded first by clients."""

    ok: bool
    code: str | None = None
    error: str | None = None


# --------------------------------------------------------------------------- requests


R_co = TypeVar("R_co", bound=Reply, covariant=True)


class Request(msgspec.Struct, Generic[R_co], frozen=True, kw_only=True):
    """Any request; its parameter is the reply it is answered with (`Client.call` returns it).

    Each request class names its reply where it names its socket, `Spawn(HostRequest[AgentReply])`,
    and `REPLY_FOR` reads it back from there: the one declaration serves the type checker, the
    client's decoder and the schema. The parameter is a type only; nothing of it goes on the wire.
    """


HostName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
"""A host of a swarm hive (SPEC §11)."""


class HostRequest(Request[R_co], frozen=True, tag_field="cmd", kw_only=True):
    """A request on host.sock (the operator's admin socket)."""


class AgentRequest(Request[R_co], frozen=True, tag_field="cmd", kw_only=True):
    """A request on an agent's own socket (and on the manager's)."""


class ListAgents(HostRequest[AgentList], frozen=True, tag="list"):
    pass


class NotificationList(Reply, frozen=True):
    notifications: list[NotificationSent]


class Notifications(HostRequest[NotificationList], frozen=True, tag="notifications"):
    """The most recent notifications (up to 100), oldest first."""


class ApprovalHistory(HostRequest[ApprovalList], frozen=True, tag="approval_history"):
    """Decided approvals (deployed, failed, denied, rolled back), newest first."""

    limit: Limit = 50


class Metrics(HostRequest[MetricsText], frozen=True, tag="metrics"):
    """The hive's Prometheus metrics (SPEC §7.4), as the dashboard's `/metrics` serves them."""


class ListReminders(HostRequest[ReminderList], frozen=True, tag="reminders"):
    """Reminders not yet delivered, soonest first: one agent's, or the whole hive's."""

    name: str | None = None


class CancelReminder(HostRequest[Done], frozen=True, tag="cancel_reminder"):
    """Drop a reminder before it is due (`not_found` when it is unknown or delivered)."""

    id: Annotated[int, msgspec.Meta(ge=1, le=2**53)]


class Config(HostRequest[ConfigView], frozen=True, tag="config"):
    """An agent's config as deployed, with its tag history."""

    name: str


class DiffConfig(HostRequest[ConfigDiff], frozen=True, tag="config_diff"):
    """The change between two of an agent's deploys (tags such as `deployed/3`, or shas)."""

    name: str
    old: Annotated[str, msgspec.Meta(max_length=64)]
    new: Annotated[str, msgspec.Meta(max_length=64)] = "main"


class History(HostRequest[TagHistory], frozen=True, tag="history"):
    """An agent's applied-repo tag history (its config's approvals and deploys), oldest first."""

    name: str


class Stats(HostRequest[StatsReply], frozen=True, tag="stats"):
    """Turns, tokens and cost per agent: its last turn, today, the last 7 days, all time."""

    name: str | None = None
    """One agent (None: every agent the daemon has turn records of, and every live one)."""


class Spawn(HostRequest[AgentReply], frozen=True, omit_defaults=True, tag="spawn"):
    name: str
    host: HostName | None = None
    """Swarm mode (SPEC §11): the host to run it on; None: placed by the hive's policy."""


class Kill(HostRequest[AgentReply], frozen=True, tag="kill"):
    name: str


class Start(HostRequest[AgentReply], frozen=True, tag="start"):
    name: str


class Restart(HostRequest[AgentReply], frozen=True, tag="restart"):
    name: str


class Rebuild(HostRequest[AgentReply], frozen=True, tag="rebuild"):
    """Re-apply the agent's config to its container and restart it."""

    name: str


class Logs(HostRequest[LogLines], frozen=True, tag="logs"):
    """The container's most recent log lines."""

    name: str
    lines: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 200


class Destroy(HostRequest[Done], frozen=True, tag="destroy"):
    name: str
    purge: bool = False


class OperatorSend(HostRequest[Sent], frozen=True, tag="send"):
    """Send as `operator`: identity is the socket, so there is no `from` field to fake."""

    to: str
    body: str
    in_reply_to: Annotated[int, msgspec.Meta(ge=1, le=2**53)] | None = None


class HostRecent(HostRequest[Inbox], frozen=True, tag="recent"):
    """The last messages of one inbox (`operator` is the dashboard's)."""

    name: str
    limit: Limit = 50


class Flow(HostRequest[Inbox], frozen=True, tag="flow"):
    """The last messages across the whole hive, oldest first (dashboard backfill)."""

    limit: Limit = 200


class DeadLetters(HostRequest[Inbox], frozen=True, tag="dead_letters"):
    """Messages no turn completed after the attempt limit: kept, never dropped."""

    limit: Limit = 100


class Requeue(HostRequest[Received], frozen=True, tag="requeue"):
    """Give a dead letter another round of attempts."""

    id: Int64


class Subscribe(HostRequest[Subscribed], frozen=True, tag="subscribe"):
    """Turn this connection into a stream of `HiveEvent` lines after the `Subscribed` reply."""


class Pending(HostRequest[ApprovalList], frozen=True, tag="pending"):
    """The approvals waiting for the operator, each with the diff it would deploy."""


class Approve(HostRequest[ApprovalReply], frozen=True, tag="approve"):
    """Approve a pending approval: deploy the pinned commit, or spawn the agent."""

    id: Int64


class Deny(HostRequest[ApprovalReply], frozen=True, tag="deny"):
    """Deny a pending approval; the note reaches the manager (and the `denied/<id>` tag)."""

    id: Int64
    note: str = ""


class HostRequestSpawn(
    HostRequest[ApprovalQueued], frozen=True, omit_defaults=True, tag="request_spawn"
):
    """Queue a spawn approval from the operator's side."""

    name: str
    description: str = ""
    host: HostName | None = None
    """Swarm mode (SPEC §11): the host to run it on; None: placed by the hive's policy."""


class MetaInputs(HostRequest[MetaInputList], frozen=True, tag="meta_inputs"):
    """The meta flake's inputs with their locked revisions and ages (SPEC §4.4)."""


class HostRequestFlakeUpdate(HostRequest[ApprovalQueued], frozen=True, tag="request_flake_update"):
    """Queue a `flake_update` approval from the operator's side: update `inputs` of the meta
    flake (all of them when empty), then rebuild the agents they reach, one at a time."""

    inputs: Annotated[list[InputName], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )
    description: str = ""


class ListQuestions(HostRequest[QuestionList], frozen=True, tag="questions"):
    """The questions nobody has resolved yet, oldest first."""


class HostAnswer(HostRequest[QuestionReply], frozen=True, tag="answer"):
    """Answer a question as `operator`: any pending one, a peer's included."""

    id: Int64
    answer: str


class CancelQuestion(HostRequest[QuestionReply], frozen=True, tag="cancel_question"):
    """Resolve a pending question with `[cancelled]`."""

    id: Int64


MessageId = Annotated[int, msgspec.Meta(ge=1, le=2**53)]


class Send(AgentRequest[Sent], frozen=True, tag="send"):
    to: str
    body: str
    in_reply_to: MessageId | None = None
    """The message this one answers: replies form threads on the agent page and dashboard."""


class Recv(AgentRequest[Received], frozen=True, tag="recv"):
    """Pop the next message. `wait_seconds` absent or 0 peeks; > 0 parks up to 180 s."""

    wait_seconds: Wait | None = None
    lease: bool = False
    """With a lease the message stays in flight until `ack`; without, it is delivered at once."""


class Ack(AgentRequest[Acked], frozen=True, tag="ack"):
    """Acknowledge a leased message once the turn that consumed it completed."""

    id: Int64
    attempt: Int64


class Nack(AgentRequest[Acked], frozen=True, tag="nack"):
    """Give a lease back because the turn failed: the message is delivered again later.

    `count` false means the failure was not the message's fault (the API was overloaded, the
    login expired): the attempt is not counted towards dead-lettering.
    """

    id: Int64
    attempt: Int64
    error: str = ""
    count: bool = True


class Status(AgentRequest[StatusReply], frozen=True, tag="status"):
    pass


class Recent(AgentRequest[Inbox], frozen=True, tag="recent"):
    limit: Limit = 30


class Wake(AgentRequest[Sent], frozen=True, tag="wake"):
    """Drop a message into the caller's own inbox, labelled with `from`."""

    sender: str = msgspec.field(name="from")
    body: str


TtlSeconds = Annotated[float, msgspec.Meta(ge=0, le=10**10)]


class Ask(AgentRequest[QuestionQueued], frozen=True, tag="ask"):
    """Queue a question for the operator (or, with `to`, for a peer agent); returns its id now.

    The answer arrives later as a `question_answered` message from `system`. `ttl_seconds` 0
    means the default (and the cap): 6 hours, after which it resolves as `[expired]`.
    """

    question: str
    options: list[str] = msgspec.field(default_factory=list)
    multi: bool = False
    ttl_seconds: TtlSeconds = 0
    to: str = ""


class Answer(AgentRequest[QuestionReply], frozen=True, tag="answer"):
    """Answer a question a peer routed to you (only its target may)."""

    id: Int64
    answer: str


class Remind(AgentRequest[ReminderQueued], frozen=True, tag="remind"):
    """Schedule `message` into the caller's own inbox, from `reminder`, at a later time.

    Exactly one of `delay_seconds` and `at_unix_timestamp` is given. With `file_path` (relative
    to the caller's `/state`) the text is written to that file and the reminder points to it;
    without, a message over 4,096 bytes is spilled to `/state/reminders/auto-<ts>-<id>.md`.
    """

    message: str
    delay_seconds: TtlSeconds | None = None
    at_unix_timestamp: TtlSeconds | None = None
    file_path: str | None = None


class FetchUiToken(AgentRequest[UiToken], frozen=True, tag="ui_token"):
    """The login token of the caller's own web UI, derived from this daemon start's secret.

    The harness asks at start and again whenever its connection to the daemon was lost: a
    restarted daemon has a new secret, so the token changes and the old one opens nothing.
    """


class OpenThreads(AgentRequest[Threads], frozen=True, tag="open_threads"):
    """Pending approvals, unanswered questions and reminders that involve the caller (the
    manager: every pending approval and question of the hive)."""


class NextTurn(AgentRequest[Sent], frozen=True, tag="next_turn"):
    """Another turn right after this one, inbox empty or not: a message from `self` ("continue")
    in the caller's own inbox. At most `NEXT_TURN_LIMIT` in a row (SPEC §4.2)."""


class ManagerListAgents(AgentRequest[AgentList], frozen=True, tag="list_agents"):
    """Manager only: every agent, as host `list` shows it."""


class ReportTurns(AgentRequest[TurnsStored], frozen=True, tag="report_turns"):
    """The harness reports finished turns (again after a restart, until they are stored)."""

    turns: Annotated[list[TurnRecord], msgspec.Meta(max_length=100)]


class ReportState(AgentRequest[Done], frozen=True, tag="report_state"):
    """The harness reports what it is doing, when that changes (SPEC §6)."""

    state: TurnState
    since: UnixTime


class RequestSpawn(
    AgentRequest[ApprovalQueued], frozen=True, omit_defaults=True, tag="request_spawn"
):
    """Manager only: ask the operator to approve a new agent."""

    name: str
    description: str = ""
    host: HostName | None = None
    """Swarm mode (SPEC §11): the host to run it on; None: placed by the hive's policy."""


class RequestApplyCommit(AgentRequest[ApprovalQueued], frozen=True, tag="request_apply_commit"):
    """Manager only: ask the operator to deploy a commit of an agent's proposed config repo.

    `commit_ref` is a 7-40 digit hex sha; it is pinned (fetched and tagged) at once.
    """

    agent: str
    commit_ref: str


class RequestFlakeUpdate(AgentRequest[ApprovalQueued], frozen=True, tag="request_flake_update"):
    """Manager only: ask the operator to approve an update of the meta flake's `inputs` (all of
    them when empty); approved, the agents they reach are rebuilt one at a time."""

    inputs: Annotated[list[InputName], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )
    description: str = ""


class KillAgent(AgentRequest[AgentReply], frozen=True, tag="kill"):
    """Manager only: stop an agent (never the manager itself)."""

    name: str


class StartAgent(AgentRequest[AgentReply], frozen=True, tag="start"):
    """Manager only: start a stopped agent."""

    name: str


class RestartAgent(AgentRequest[AgentReply], frozen=True, tag="restart"):
    """Manager only: restart an agent."""

    name: str


class UpdateAgent(AgentRequest[AgentReply], frozen=True, tag="update"):
    """Manager only: rebuild an agent (re-apply its config, restart it); idempotent, no approval."""

    name: str


# --------------------------------------------------------------------------- events


class HiveEvent(msgspec.Struct, frozen=True, tag_field="event", kw_only=True):
    """A line on a `subscribe` stream."""

    seq: int = 0


class MessageSent(HiveEvent, frozen=True, tag="message_sent"):
    message: Message


class MessageDelivered(HiveEvent, frozen=True, tag="message_delivered"):
    id: int
    to: str


class MessageLeased(HiveEvent, frozen=True, tag="message_leased"):
    """A turn took the message: it is in flight until acked (or given back)."""

    id: int
    to: str
    attempt: int


class AgentChanged(HiveEvent, frozen=True, tag="agent_changed"):
    agent: AgentInfo


class AgentRemoved(HiveEvent, frozen=True, tag="agent_removed"):
    name: str


class ApprovalChanged(HiveEvent, frozen=True, tag="approval_changed"):
    """An approval was queued or changed status. `diff` is empty here: `pending` carries it."""

    approval: ApprovalInfo


class QuestionChanged(HiveEvent, frozen=True, tag="question_changed"):
    """A question was asked (for the operator or a peer) or resolved, however it ended."""

    question: QuestionInfo


NotificationKind = Literal[
    "approval", "question", "needs_login", "stalled", "crash_looping", "system", "reminder"
]


class NotificationItem(msgspec.Struct, frozen=True, kw_only=True):
    kind: NotificationKind
    agent: str = ""
    text: str
    ref: int | None = None
    """The approval's or question's id, where there is one."""


class NotificationSent(HiveEvent, frozen=True, tag="notification"):
    """Something needs the operator (SPEC §4.3): one cause once until it is resolved; several
    within the digest window come as one notification."""

    id: int
    at: float
    title: str
    items: list[NotificationItem]


class Dropped(HiveEvent, frozen=True, tag="dropped"):
    """Sent (best effort) just before a subscriber that fell behind is disconnected."""

    reason: str


HostRequests = (
    ListAgents
    | Stats
    | Metrics
    | Notifications
    | ListReminders
    | CancelReminder
    | History
    | Config
    | DiffConfig
    | ApprovalHistory
    | Spawn
    | Kill
    | Start
    | Restart
    | Rebuild
    | Logs
    | Destroy
    | OperatorSend
    | HostRecent
    | Flow
    | DeadLetters
    | Requeue
    | Subscribe
    | Pending
    | Approve
    | Deny
    | HostRequestSpawn
    | MetaInputs
    | HostRequestFlakeUpdate
    | ListQuestions
    | HostAnswer
    | CancelQuestion
)
AgentRequests = (
    Send
    | Recv
    | Ack
    | Nack
    | Status
    | Recent
    | Wake
    | Ask
    | Answer
    | Remind
    | FetchUiToken
    | ReportTurns
    | ReportState
    | OpenThreads
    | NextTurn
)
ManagerOnlyRequests = (
    RequestSpawn
    | RequestApplyCommit
    | RequestFlakeUpdate
    | KillAgent
    | StartAgent
    | RestartAgent
    | UpdateAgent
    | ManagerListAgents
)
ManagerRequests = AgentRequests | ManagerOnlyRequests
HiveEvents = (
    MessageSent
    | MessageDelivered
    | MessageLeased
    | AgentChanged
    | AgentRemoved
    | ApprovalChanged
    | QuestionChanged
    | NotificationSent
    | Dropped
)

HOST_COMMANDS = frozenset(t.__struct_config__.tag for t in HostRequests.__args__)
AGENT_COMMANDS = frozenset(t.__struct_config__.tag for t in AgentRequests.__args__)
MANAGER_COMMANDS = frozenset(t.__struct_config__.tag for t in ManagerRequests.__args__)


def _declared_reply(request_type: type[Request[Reply]]) -> type[Reply]:
    """The reply a request class names in its base, `HostRequest[AgentReply]` → `AgentReply`."""
    for base in getattr(request_type, "__orig_bases__", ()):
        for arg in get_args(base):
            if isinstance(arg, type) and issubclass(arg, Reply):
                return arg
    raise TypeError(f"{request_type.__name__} does not name its reply type")


REPLY_FOR: dict[type[Request[Reply]], type[Reply]] = {
    t: _declared_reply(t) for t in (*HostRequests.__args__, *ManagerRequests.__args__)
}
"""The reply type of each request, as its class declares it: what a client decodes and what the
schema documents."""
