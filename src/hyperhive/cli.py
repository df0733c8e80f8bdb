"""`hive-c0re`: the daemon (`serve`) and the operator's command line, a client of host.sock."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from hyperhive.protocol.errors import ConnectionLost, HiveError

if TYPE_CHECKING:
    from hyperhive.core.config import DaemonConfig

DEFAULT_RUN_DIR = "/run/hyperhive"
DEFAULT_STATE_DIR = "/var/lib/hyperhive"


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _byte_size(text: str) -> int:
    """An argparse type for a size in bytes: 67108864, 64M, 64MiB, 1G (0 = no bound)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G, 0 for no bound)")
    return int(match[1]) * _UNITS[match[2].upper()]


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _limit(field: str) -> Callable[[str], str]:
    """An argparse type for one of agent.toml's [limits], validated the same way."""

    def check(text: str) -> str:
        from hyperhive.protocol.agent_config import Limits

        try:
            msgspec.convert({field: text}, Limits)
        except msgspec.ValidationError:
            raise argparse.ArgumentTypeError(f"not a valid {field}: {text!r}") from None
        return text

    return check


def _container_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,11}", text):
        raise argparse.ArgumentTypeError(f"not a nixos-container name: {text!r}")
    return text


def _nats_urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    if not urls:
        raise argparse.ArgumentTypeError("give at least one nats:// URL")
    for url in urls:
        if not re.fullmatch(r"(nats|tls)://[A-Za-z0-9.\-\[\]:]+(:\d+)?", url):
            raise argparse.ArgumentTypeError(f"{url!r} is not a nats://host:port URL")
    return urls


def _host_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", text):
        raise argparse.ArgumentTypeError(
            "a host name is 1-32 of a-z, 0-9 and '-', starting with a letter or digit"
        )
    return text


def _default_host_name() -> str:
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower().split(".")[0])[:32]
    return name.strip("-") or "host"


def _hive_name(text: str) -> str:
    from hyperhive.core.forge_org import check_hive_name

    try:
        return check_hive_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forge_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0 or parts.query:
        raise argparse.ArgumentTypeError(f"not an http(s) URL of a forge: {text!r}")
    return text.rstrip("/")


def _host_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        type=_host_name,
        default=None,
        metavar="NAME",
        help="in a swarm, the host to run it on (default: the live host with the most available"
        " memory, then the fewest agents)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hive-c0re", description=__doc__)
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("HIVE_RUN_DIR", DEFAULT_RUN_DIR),
        help="where host.sock lives (default %(default)s, or $HIVE_RUN_DIR)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")
    parser.add_argument(
        "--url",
        metavar="URL",
        default=os.environ.get("HIVE_URL"),
        help="act on the hive behind this dashboard (https://host:7000; or $HIVE_URL) instead of"
        " host.sock, with the dashboard's requests only; the token comes from --token-file or"
        " $HIVE_TOKEN (or the #token= of the login URL `hive-c0re url` prints)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=os.environ.get("HIVE_TOKEN_FILE"),
        help="a file holding the dashboard's login token, for --url",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the host daemon")
    serve.add_argument("--state-dir", default=os.environ.get("HIVE_STATE_DIR", DEFAULT_STATE_DIR))
    serve.add_argument("--backend", default="bwrap", choices=["bwrap", "nspawn", "nixos"])
    serve.add_argument(
        "--hyperhive-flake",
        default="git+file:///etc/hyperhive",
        help="nixos backend: the flake reference of hyperhive itself",
    )
    serve.add_argument("--demo", action="store_true", help="run against the bundled scripted model")
    serve.add_argument("--dashboard-port", type=int, default=7000)
    serve.add_argument("--bind", default="127.0.0.1")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the dashboard and agent UIs answer to when bound beyond loopback"
        " (repeatable)",
    )
    serve.add_argument("--ui-port-base", type=int, default=8000)
    serve.add_argument("--model", default="haiku")
    serve.add_argument("--operator-pronouns", default="she/her")
    serve.add_argument(
        "--claude-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pass a variable to every agent's claude (repeatable), e.g. ANTHROPIC_BASE_URL",
    )
    serve.add_argument("--no-manager", action="store_true", help="do not create hm1nd")
    serve.add_argument(
        "--admin-group",
        metavar="GROUP",
        help="members of GROUP may use host.sock and read the login URL (`hive-c0re url`)",
    )
    serve.add_argument(
        "--agent-memory-max",
        type=_limit("memory_max"),
        metavar="SIZE",
        help="memory limit of agents whose agent.toml sets none, e.g. 4G",
    )
    serve.add_argument(
        "--agent-cpu-quota",
        type=_limit("cpu_quota"),
        metavar="PERCENT",
        help="CPU limit of agents whose agent.toml sets none, e.g. 200%%",
    )
    serve.add_argument(
        "--agent-state-max",
        type=_limit("state_max"),
        metavar="SIZE",
        help="/state size of agents whose agent.toml sets none, e.g. 10G (bwrap/nspawn: the"
        " agent's /state becomes a volume of that size)",
    )
    serve.add_argument(
        "--agent-uid-base",
        type=int,
        default=300000,
        metavar="UID",
        help="first of the 1000 uids agents run as on bwrap/nspawn (the manager's; default"
        " 300000); none of them may belong to a host user",
    )
    serve.add_argument(
        "--forge-container",
        type=_container_name,
        metavar="NAME",
        help="the nixos-container running the hive's Forgejo (services.hive-forge)",
    )
    serve.add_argument(
        "--forge-url",
        type=_forge_url,
        default="http://localhost:3000",
        metavar="URL",
        help="where that forge serves: the config mirrors are pushed there, agents are told it"
        " (default %(default)s)",
    )
    serve.add_argument(
        "--hive-name",
        type=_hive_name,
        default="hive",
        metavar="NAME",
        help="the hive's name: its organisation on the forge (default %(default)s)",
    )
    serve.add_argument(
        "--line-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a socket client may take over a line or a reply (default %(default)s)",
    )
    serve.add_argument(
        "--deploy-health-window",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long an approved deploy is watched for a crash loop or failing turns, which"
        " roll it back (default %(default)s)",
    )
    serve.add_argument(
        "--swarm",
        type=_nats_urls,
        default=(),
        metavar="URL[,URL...]",
        help="run this host as part of a hive across hosts on NATS JetStream (SPEC §11):"
        " the servers' nats:// URLs",
    )
    serve.add_argument(
        "--host-name",
        type=_host_name,
        default=None,
        metavar="NAME",
        help="this host's name in the swarm (default: the machine's host name)",
    )
    serve.add_argument(
        "--swarm-credentials",
        type=Path,
        default=None,
        metavar="FILE",
        help="this host's NATS credentials: a .creds file or a file holding a token (0600,"
        " root's); needed whenever NATS is reachable from anything but the hive's hosts",
    )
    serve.add_argument(
        "--swarm-replicas",
        type=int,
        choices=(0, 1, 3, 5),
        default=0,
        metavar="N",
        help="replicas of the swarm's streams (default: 3 with 3+ servers, else 1)",
    )
    serve.add_argument(
        "--no-auto-update",
        action="store_true",
        help="after an upgrade, only mark agents built from an older hyperhive `needs update`"
        " instead of rebuilding them one at a time",
    )
    serve.add_argument(
        "--inbox-quota",
        type=_byte_size,
        default=64 * 1024**2,
        metavar="SIZE",
        help="most bytes of undelivered messages one inbox may hold (default 64M; 0 = no bound)",
    )
    serve.add_argument(
        "--sender-quota",
        type=_byte_size,
        default=64 * 1024**2,
        metavar="SIZE",
        help="most bytes of undelivered messages one agent may have waiting in all inboxes"
        " (default 64M; 0 = no bound)",
    )
    serve.add_argument(
        "--no-group-commit",
        action="store_true",
        help="one fsync per write instead of per batch (for benchmarks)",
    )
    serve.add_argument("--log-level", default="INFO")

    sub.add_parser("url", help="print the dashboard's login URL (it carries the login token)")
    doctor = sub.add_parser("doctor", help="check this host's tools and the running hive")
    doctor.add_argument("--backend", choices=("bwrap", "nspawn", "nixos"), default="bwrap")
    doctor.add_argument("--agent-uid-base", type=int, default=300000)
    sub.add_parser("list", help="list agents")
    watch = sub.add_parser("watch", help="follow the notifications: what needs you, as it happens")
    watch.add_argument(
        "--recent", action="store_true", help="print the recent ones first (up to 100)"
    )
    reminders = sub.add_parser("reminders", help="reminders not yet delivered, soonest first")
    reminders.add_argument("name", nargs="?", default=None)
    sub.add_parser("cancel-reminder", help="drop a pending reminder").add_argument("id", type=int)
    sub.add_parser(
        "history", help="an agent's config history: its applied repo's tags, oldest first"
    ).add_argument("name")
    config = sub.add_parser("config", help="an agent's config as deployed (agent.toml, agent.nix)")
    config.add_argument("name")
    config.add_argument(
        "--diff",
        nargs="+",
        metavar="REF",
        help="instead, the change between two deploys: OLD [NEW=main] (tags or shas)",
    )
    stats = sub.add_parser("stats", help="turns, tokens and cost per agent")
    stats.add_argument("name", nargs="?", default=None)
    spawn = sub.add_parser("spawn", help="create and start an agent (no approval)")
    spawn.add_argument("name")
    _host_flag(spawn)
    for verb, text in (
        ("kill", "stop an agent gracefully"),
        ("start", "start a stopped agent"),
        ("restart", "restart an agent"),
        ("rebuild", "re-apply an agent's config and restart it"),
    ):
        sub.add_parser(verb, help=text).add_argument("name")
    logs = sub.add_parser("logs", help="an agent's container output, most recent last")
    logs.add_argument("name")
    logs.add_argument("--lines", type=int, default=200, help="how many (1-5000)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    destroy = sub.add_parser("destroy", help="remove an agent (state kept unless --purge)")
    destroy.add_argument("name")
    destroy.add_argument("--purge", action="store_true")
    send = sub.add_parser("send", help="send a message as operator")
    send.add_argument("to")
    send.add_argument("body", nargs="+")
    recent = sub.add_parser("recent", help="show an inbox (operator, manager or an agent)")
    recent.add_argument("name", nargs="?", default="operator")
    recent.add_argument("--limit", type=int, default=20)
    dead = sub.add_parser("dead-letters", help="messages no turn completed (kept, never dropped)")
    dead.add_argument("--limit", type=int, default=100)
    sub.add_parser("requeue", help="give a dead letter another round of attempts").add_argument(
        "id", type=int
    )
    sub.add_parser("pending", help="approvals waiting for the operator, with their diffs")
    sub.add_parser("approve", help="approve a pending approval").add_argument("id", type=int)
    deny = sub.add_parser("deny", help="deny a pending approval")
    deny.add_argument("id", type=int)
    deny.add_argument("--note", default="", help="why (sent to the manager)")
    sub.add_parser("questions", help="questions waiting for an answer")
    answer = sub.add_parser("answer", help="answer a question as operator")
    answer.add_argument("id", type=int)
    answer.add_argument("text", nargs="+")
    sub.add_parser("cancel-question", help="resolve a question as [cancelled]").add_argument(
        "id", type=int
    )
    request_spawn = sub.add_parser("request-spawn", help="queue a spawn approval")
    request_spawn.add_argument("name")
    request_spawn.add_argument("--description", default="")
    _host_flag(request_spawn)
    sub.add_parser(
        "meta-inputs", help="the meta flake's inputs, their locked revisions and ages (nixos)"
    )
    flake_update = sub.add_parser(
        "flake-update",
        help="queue a flake_update approval: update meta flake inputs (all when none named),"
        " then rebuild the agents they reach one at a time (nixos)",
    )
    flake_update.add_argument("inputs", nargs="*", metavar="INPUT")
    flake_update.add_argument("--description", default="")
    return parser


def _request(args: argparse.Namespace) -> wire.HostRequest[wire.Reply]:
    match args.command:
        case "list":
            return wire.ListAgents()
        case "stats":
            return wire.Stats(name=args.name)
        case "reminders":
            return wire.ListReminders(name=args.name)
        case "cancel-reminder":
            return wire.CancelReminder(id=args.id)
        case "history":
            return wire.History(name=args.name)
        case "config" if args.diff:
            old, new = [*args.diff, "main"][:2]
            return wire.DiffConfig(name=args.name, old=old, new=new)
        case "config":
            return wire.Config(name=args.name)
        case "spawn":
            return wire.Spawn(name=args.name, host=args.host)
        case "kill":
            return wire.Kill(name=args.name)
        case "start":
            return wire.Start(name=args.name)
        case "restart":
            return wire.Restart(name=args.name)
        case "rebuild":
            return wire.Rebuild(name=args.name)
        case "logs":
            return wire.Logs(name=args.name, lines=args.lines)
        case "destroy":
            return wire.Destroy(name=args.name, purge=args.purge)
        case "send":
            return wire.OperatorSend(to=args.to, body=" ".join(args.body))
        case "recent":
            return wire.HostRecent(name=args.name, limit=args.limit)
        case "dead-letters":
            return wire.DeadLetters(limit=args.limit)
        case "requeue":
            return wire.Requeue(id=args.id)
        case "pending":
            return wire.Pending()
        case "approve":
            return wire.Approve(id=args.id)
        case "deny":
            return wire.Deny(id=args.id, note=args.note)
        case "request-spawn":
            return wire.HostRequestSpawn(
                name=args.name, description=args.description, host=args.host
            )
        case "meta-inputs":
            return wire.MetaInputs()
        case "flake-update":
            return wire.HostRequestFlakeUpdate(inputs=args.inputs, description=args.description)
        case "questions":
            return wire.ListQuestions()
        case "answer":
            return wire.HostAnswer(id=args.id, answer=" ".join(args.text))
        case "cancel-question":
            return wire.CancelQuestion(id=args.id)
    raise SystemExit(f"unknown command {args.command}")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _approval(a: wire.ApprovalInfo) -> str:
    what = f"{a.sha[:12]}" if a.kind == "apply_commit" else a.description
    if a.kind == "flake_update":
        what = f"{a.commit_ref or 'all inputs'} {a.description}".rstrip()
    head = f"#{a.id} {a.kind} {a.agent} {a.status} {_when(a.requested_at)} {what}".rstrip()
    if a.note:
        head += f"\n  note: {a.note}"
    return head + (f"\n{a.diff.rstrip()}" if a.diff else "")


def _age(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    days = (now - then) / 86400
    return f"{days:.0f} days" if days >= 1 else f"{(now - then) / 3600:.0f} hours"


def _question(q: wire.QuestionInfo) -> str:
    to = q.target or "operator"
    head = f"#{q.id} {q.asker} → {to} {_when(q.asked_at)} (expires {_when(q.deadline_at)})"
    lines = [head, f"  {q.question}"]
    if q.options:
        lines.append(f"  options{' (several)' if q.multi else ''}: {' | '.join(q.options)}")
    if q.answer is not None:
        lines.append(f"  answer by {q.answerer}: {q.answer}")
    return "\n".join(lines)


def _usage(u: wire.Usage) -> str:
    tokens = u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens
    return f"{u.turns} turns, {tokens:,} tokens, ${u.cost_usd:.4f}"


def _stats(a: wire.AgentStats) -> str:
    last = "no turns yet"
    if a.last_turn is not None:
        t = a.last_turn
        took = t.ended_at - t.started_at
        last = f"last {_when(t.ended_at)} ({t.outcome}, {took:.1f}s, ${t.cost_usd:.4f})"
    return (
        f"{a.name}: {last}\n  today {_usage(a.today)}\n  7 days {_usage(a.week)}"
        f"\n  total {_usage(a.total)}"
    )


def _dashboard_line(dashboard: wire.ListenerStatus | None) -> str:
    """Said only when the dashboard does not serve: why, and when it is tried again."""
    if dashboard is None or dashboard.state == "serving":
        return ""
    what = "WAITING for port" if dashboard.state == "waiting_for_port" else "FAILED on port"
    line = f"\ndashboard: {what} {dashboard.port}: {dashboard.error}"
    if dashboard.since is not None:
        line += f"\n  since {_when(dashboard.since)}, {dashboard.failed_attempts} failed attempts"
    if dashboard.retry_at is not None:
        line += f"; next at {_when(dashboard.retry_at)}"
    return line


def render(reply: wire.Reply) -> str:
    match reply:
        case wire.AgentList(agents=agents, forge=forge, dashboard=dashboard):
            footer = _dashboard_line(dashboard)
            if forge is not None and forge.state == "failed":
                footer += f"\nforge: FAILED: {forge.problem}\n  fix: {forge.fix}"
            if not agents:
                return "no agents" + footer
            # A swarm's agents run on several hosts: which one is a column of its own.
            swarm = any(a.host is not None for a in agents)
            host_column = ("HOST",) if swarm else ()
            rows: list[tuple[str, ...]] = [
                ("NAME", *host_column, "ROLE", "STATE", "PORT", "UNREAD", "DEPLOYED", "NOTE")
            ]
            for a in agents:
                notes = [
                    "host down" if a.host_down else "",
                    "needs login" if a.needs_login else "",
                    f"port {a.port} taken by another process" if a.port_conflict else "",
                    "needs update" if a.needs_update else "",
                    a.last_error or "",
                    a.limits_note or "",
                ]
                note = "; ".join(n for n in notes if n)
                deployed = a.deployed or "-"
                where = (a.host or "-",) if swarm else ()
                state, port, unread = a.state, str(a.port), str(a.unread)
                rows.append((a.name, *where, a.role, state, port, unread, deployed, note[:60]))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            table = "\n".join(
                (
                    "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
                    + "  "
                    + r[-1]
                ).rstrip()
                for r in rows
            )
            return table + footer
        case wire.AgentReply(agent=a):
            return f"{a.name}: {a.state}"
        case wire.Sent(ids=ids, recipients=recipients):
            return f"sent #{', #'.join(map(str, ids))} to {', '.join(recipients)}"
        case wire.Inbox(messages=messages):
            if not messages:
                return "(empty)"
            return "\n".join(
                f"{_when(m.sent_at)}  #{m.id} {m.sender} → {m.to}: {m.body}" for m in messages
            )
        case wire.Received(message=m):
            return "(nothing)" if m is None else f"#{m.id} {m.sender} → {m.to}: {m.state}"
        case wire.ReminderList(reminders=reminders):
            return (
                "\n".join(
                    f"#{r.id} {r.to} due {_when(r.due_at)}: {r.message[:200]}" for r in reminders
                )
                or "no pending reminders"
            )
        case wire.ConfigView(name=name, agent_toml=toml, agent_nix=nix, deployed=deployed):
            return (
                f"{name}: {deployed or 'not in the meta repo'}\n--- agent.toml\n{toml.rstrip()}"
                f"\n--- agent.nix\n{nix.rstrip()}"
            )
        case wire.ConfigDiff(diff=diff):
            return diff.rstrip()
        case wire.TagHistory(name=name, tags=tags):
            lines = [f"{name}: {len(tags)} tags"]
            for t in tags:
                note = f"  — {t.note.splitlines()[0][:160]}" if t.note else ""
                lines.append(f"{_when(t.at)}  {t.tag:<16} {t.sha[:12]}{note}")
            return "\n".join(lines)
        case wire.StatsReply(agents=agents):
            return "\n".join(_stats(a) for a in agents) or "no turns recorded yet"
        case wire.LogLines(lines=lines):
            return "\n".join(lines)
        case wire.Done():
            return "ok"
        case wire.ApprovalList(approvals=approvals):
            if not approvals:
                return "no pending approvals"
            return "\n\n".join(_approval(a) for a in approvals)
        case wire.ApprovalReply(approval=a):
            return _approval(a)
        case wire.QuestionList(questions=questions):
            return "\n\n".join(map(_question, questions)) if questions else "no pending questions"
        case wire.QuestionReply(question=q):
            return _question(q)
        case wire.MetaInputList(inputs=inputs, updatable=updatable):
            if not inputs:
                return "the meta flake has no lock yet" if updatable else "no meta flake lock"
            now = time.time()
            lines = [
                f"{i.name:<24} {i.rev:<12} {_age(now, i.last_modified):>9}  {i.url}" for i in inputs
            ]
            note = "" if updatable else "\n(not updatable: this hive's backend is not nixos)"
            return "\n".join(lines) + note
        case wire.ApprovalQueued(id=aid, sha=sha):
            return f"approval #{aid} queued" + (f" ({sha[:12]})" if sha else "")
    return msgspec.json.encode(reply).decode()


def daemon_config(args: argparse.Namespace, claude: str | None) -> DaemonConfig:
    """`hive-c0re serve`'s arguments as the daemon's configuration."""
    from hyperhive.core.config import DaemonConfig

    return DaemonConfig(
        state_dir=Path(args.state_dir),
        run_dir=Path(args.run_dir),
        backend=args.backend,
        hyperhive_flake=args.hyperhive_flake,
        demo=args.demo,
        bind=args.bind,
        allowed_hosts=tuple(args.allowed_host),
        dashboard_port=args.dashboard_port,
        ui_port_base=args.ui_port_base,
        start_manager=not args.no_manager,
        claude_env=dict(args.claude_env),
        model=args.model,
        operator_pronouns=args.operator_pronouns,
        admin_group=args.admin_group,
        agent_memory_max=args.agent_memory_max,
        agent_cpu_quota=args.agent_cpu_quota,
        agent_uid_base=args.agent_uid_base,
        agent_state_max=args.agent_state_max,
        forge_container=args.forge_container,
        forge_url=args.forge_url,
        hive_name=args.hive_name,
        claude_bin=claude or "claude",
        crash_at=os.environ.get("HIVE_CRASH_AT") or None,
        line_timeout=args.line_timeout,
        deploy_health_window=args.deploy_health_window,
        auto_update=not args.no_auto_update,
        swarm=args.swarm,
        host_name=args.host_name or _default_host_name(),
        swarm_replicas=args.swarm_replicas,
        swarm_credentials=args.swarm_credentials,
        group_commit=not args.no_group_commit,
        inbox_quota=args.inbox_quota,
        sender_quota=args.sender_quota,
    )


def serve(args: argparse.Namespace) -> int:
    from hyperhive.app import serve_until_signalled

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    claude = shutil.which("claude")
    cfg = daemon_config(args, claude)
    if claude is None:
        print("hive-c0re: warning: no `claude` on PATH; agents cannot run turns", file=sys.stderr)
    trio.run(serve_until_signalled, cfg)
    return 0


def login_url(args: argparse.Namespace) -> int:
    """`hive-c0re url`: the login URL the running daemon wrote next to host.sock."""
    from hyperhive.core.config import DaemonConfig

    path = DaemonConfig(run_dir=Path(args.run_dir)).dashboard_url_path
    try:
        url = path.read_text("ascii").strip()
    except FileNotFoundError:
        print(
            f"hive-c0re: no {path}: is `hive-c0re serve` running, with a dashboard?",
            file=sys.stderr,
        )
        return 1
    except PermissionError:
        print(f"hive-c0re: cannot read {path}: run this as the daemon's user", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hive-c0re: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode({"url": url}).decode() if args.json else url)
    return 0


def _notification(note: wire.NotificationSent) -> str:
    lines = [f"{_when(note.at)}  {note.title}"]
    if len(note.items) > 1:
        lines += [f"  - [{item.kind}] {item.text}" for item in note.items]
    return "\n".join(lines)


async def _watch(sock: str, recent: bool, as_json: bool) -> None:
    def show(note: wire.NotificationSent) -> None:
        print(msgspec.json.encode(note).decode() if as_json else _notification(note), flush=True)

    async with open_client(sock) as client:
        if recent:
            for note in (await client.call(wire.Notifications())).notifications:
                show(note)
        await client.call(wire.Subscribe())
        async with aclosing(client.events()) as events:
            async for event in events:
                if isinstance(event, wire.NotificationSent):
                    show(event)
    raise ConnectionLost("the daemon closed the event stream")


FOLLOW_EVERY = 1.0


def new_lines(seen: list[str], got: list[str]) -> list[str]:
    """The lines of `got` (a log's latest tail) after what `seen` (the previous tail) ended
    with: found by the last lines of `seen` as a run in `got`; all of `got` if it is not there
    (the log started over)."""
    for k in range(min(len(seen), 20), 0, -1):
        tail = seen[-k:]
        for end in range(len(got), k - 1, -1):
            if got[end - k : end] == tail:
                return got[end:]
    return got


async def _follow_logs(sock: str, name: str, lines: int) -> None:
    """Print the container's log, then what it adds (its tail fetched again every second)."""
    seen: list[str] = []
    async with open_client(sock) as client:
        while True:
            got = (await client.call(wire.Logs(name=name, lines=5000 if seen else lines))).lines
            for line in new_lines(seen, got):
                print(line, flush=True)
            seen = got
            await trio.sleep(FOLLOW_EVERY)


def _until_interrupted(fn: Callable[..., Awaitable[None]], *args: object) -> int:
    """Run a following command until ^C (exit 0) or a daemon error (exit 1, said why)."""
    try:
        trio.run(fn, *args)
    except HiveError as err:
        print(f"hive-c0re: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def run_follow_logs(args: argparse.Namespace) -> int:
    """`hive-c0re logs -f NAME`: until interrupted."""
    sock = str(Path(args.run_dir) / "host.sock")
    return _until_interrupted(_follow_logs, sock, args.name, args.lines)


def run_watch(args: argparse.Namespace) -> int:
    """`hive-c0re watch`: the notification stream of host.sock, until interrupted."""
    if args.url:
        print("hive-c0re: watch works on host.sock only (not with --url)", file=sys.stderr)
        return 1
    return _until_interrupted(_watch, str(Path(args.run_dir) / "host.sock"), args.recent, args.json)


def run_doctor(args: argparse.Namespace) -> int:
    """`hive-c0re doctor`: exit status 1 when a check failed (warnings do not)."""
    from hyperhive.doctor import doctor, render

    report = doctor(
        backend=args.backend,
        claude=shutil.which("claude") or "claude",
        uid_base=args.agent_uid_base,
        run_dir=Path(args.run_dir),
    )
    print(msgspec.json.encode(report).decode() if args.json else render(report))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "url":
        return login_url(args)
    if args.command == "doctor":
        return run_doctor(args)
    if args.command == "watch":
        return run_watch(args)
    if args.command == "logs" and args.follow and not args.url:
        return run_follow_logs(args)
    sock = str(Path(args.run_dir) / "host.sock")
    try:
        if args.url:
            from hyperhive.remote import Remote, call_remote

            remote = Remote.from_sources(
                args.url, token_file=args.token_file, env_token=os.environ.get("HIVE_TOKEN")
            )
            reply: wire.Reply = trio.run(call_remote, remote, _request(args))
        else:
            reply = trio.run(call_once, sock, _request(args))
    except HiveError as err:
        if args.json:
            print(
                msgspec.json.encode({"ok": False, "code": err.code, "error": err.message}).decode()
            )
        else:
            print(f"hive-c0re: {err.message}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(reply).decode() if args.json else render(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
