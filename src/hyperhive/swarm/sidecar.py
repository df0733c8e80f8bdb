"""The swarm's NATS sidecar: nats-py (asyncio) in its own process, driven by the daemon.

hive-c0re stays pure trio (STYLE.md): it starts this as a child process and speaks JSON lines
over the child's stdin/stdout — no socket file, so nothing an agent could reach. Each request
line `{"id": n, "op": ..., ...}` is answered by one line `{"id": n, "ok": {...}}` or `{"id": n,
"error": "...", "kind": "..."}`, in completion order (requests run concurrently). Subscriptions
(`kv_watch`, `serve`) also push unsolicited lines `{"push": n, ...}` tagged with the id of the
request that opened them. Issue 16's spike (scripts/spike_nats.py) measured this against
trio-asyncio in-process: the same latency, more throughput, and the daemon keeps one event loop.

The sidecar holds no broker state: a lease is the JetStream reply subject the daemon keeps (and
persists), acknowledged here by subject, so a restarted sidecar (or daemon) can still settle it.

    python -m hyperhive.swarm.sidecar --servers nats://h1:4222,nats://h2:4222 --name h1
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: TID251 - nats-py is asyncio's; this process is the boundary
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from hyperhive.swarm import subjects as s

Json = dict[str, Any]

DAY = 86400.0


def stream_configs(replicas: int) -> list[StreamConfig]:
    """The hive's streams (SPEC §11): inboxes (a work queue), dead letters, the operator's."""
    return [
        StreamConfig(
            name=s.INBOX_STREAM,
            subjects=[f"{s.INBOX}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=s.DEDUPE_WINDOW,
            max_msg_size=s.MAX_PAYLOAD,
        ),
        StreamConfig(
            name=s.DEAD_STREAM,
            subjects=[f"{s.DEAD}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=s.KEEP_DAYS * DAY,
            duplicate_window=s.DEDUPE_WINDOW,
        ),
        StreamConfig(
            name=s.OPERATOR_STREAM,
            subjects=[s.OPERATOR_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=s.KEEP_DAYS * DAY,
            max_msgs=100_000,
            discard=DiscardPolicy.OLD,
            duplicate_window=s.DEDUPE_WINDOW,
        ),
    ]


def _b(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class Sidecar:
    def __init__(
        self,
        servers: list[str],
        name: str,
        write: Callable[[Json], None],
        credentials: str | None = None,
    ) -> None:
        self.servers = servers
        self.name = name
        self.credentials = credentials
        self.write = write
        self.nc: Any = None
        self.js: Any = None
        self.kv: dict[str, Any] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def _auth(self) -> Json:
        """nats-py's options for this host's credentials: a .creds file (JWT and nkey seed), or
        a file that holds a token."""
        if self.credentials is None:
            return {}
        with open(self.credentials) as f:
            text = f.read()
        if "BEGIN NATS USER JWT" in text:
            return {"user_credentials": self.credentials}
        return {"token": text.strip()}

    async def connect(self) -> None:
        auth = self._auth()
        while True:
            try:
                self.nc = await nats.connect(
                    **auth,
                    servers=self.servers,
                    name=f"hive-c0re {self.name}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=2,
                    allow_reconnect=True,
                )
                break
            except Exception as exc:
                print(f"sidecar: nats connect failed: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.5)
        self.js = self.nc.jetstream(timeout=s.API_TIMEOUT)

    # ------------------------------------------------------------------ ops

    async def op_setup(self, req: Json) -> Json:
        """Create (or bring up to date) the hive's streams and buckets."""
        replicas = int(req["replicas"])
        for config in stream_configs(replicas):
            try:
                await self.js.add_stream(config)
            except Exception:
                await self.js.update_stream(config)
        buckets = ((s.AGENTS_BUCKET, 0.0), (s.SLOTS_BUCKET, 0.0), (s.HOSTS_BUCKET, 3600.0))
        for bucket, ttl in buckets:
            kv_config = KeyValueConfig(bucket=bucket, history=1, replicas=replicas, ttl=ttl or None)
            try:
                self.kv[bucket] = await self.js.create_key_value(kv_config)
            except Exception:
                self.kv[bucket] = await self.js.key_value(bucket)
        return {}

    async def op_consumer(self, req: Json) -> Json:
        """The durable pull consumer of one inbox (idempotent)."""
        config = ConsumerConfig(
            durable_name=req["durable"],
            filter_subject=req["filter"],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=float(req["ack_wait"]),
            max_deliver=-1,
            max_ack_pending=s.MAX_ACK_PENDING,
            num_replicas=int(req.get("replicas", 0)) or None,
        )
        await self.js.add_consumer(s.INBOX_STREAM, config)
        return {}

    async def op_publish(self, req: Json) -> Json:
        """A durable publish: answered with the stream sequence once JetStream stored it."""
        headers = dict(req.get("headers") or {})
        headers["Nats-Msg-Id"] = req["msg_id"]
        ack = await self.js.publish(
            req["subject"], req["data"].encode(), headers=headers, timeout=s.API_TIMEOUT
        )
        return {"seq": ack.seq, "duplicate": bool(ack.duplicate), "stream": ack.stream}

    async def op_fetch(self, req: Json) -> Json:
        """One message of a durable consumer, waiting up to `wait` seconds (0: none waiting).

        Raw pull request rather than nats-py's `fetch`: its client-side timeout can give up a
        moment before the server delivers, leaving a message delivered to nobody until its ack
        wait ends. Here the answer is the server's: a message, or its 404/408 status."""
        wait = float(req["wait"])
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def got(msg: Any) -> None:
            await queue.put(msg)

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=got)
        try:
            pull: Json = {"batch": 1}
            if wait > 0:
                pull["expires"] = int(wait * 1e9)
            else:
                pull["no_wait"] = True
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{s.INBOX_STREAM}.{req['durable']}"
            await self.nc.publish(subject, json.dumps(pull).encode(), reply=inbox)
            while True:
                msg = await asyncio.wait_for(queue.get(), wait + s.API_TIMEOUT)
                status = (msg.headers or {}).get("Status")
                if status is None:
                    meta = msg.metadata
                    return {
                        "msg": {
                            "data": _b(msg.data),
                            "headers": {
                                k: v for k, v in (msg.headers or {}).items() if k.startswith("H")
                            },
                            "seq": meta.sequence.stream,
                            "delivered": meta.num_delivered,
                            "reply": msg.reply,
                            "subject": msg.subject,
                        }
                    }
                if status == "100":  # an idle heartbeat
                    continue
                if status in ("404", "408", "409"):  # nothing came / the request ended
                    return {"msg": None, "status": status}
                raise RuntimeError(f"pull request failed: {status} {msg.headers}")
        finally:
            await sub.unsubscribe()

    async def op_settle(self, req: Json) -> Json:
        """Acknowledge by reply subject: +ACK (confirmed by the server), -NAK, +WPI, +TERM."""
        kind = req["kind"]
        payload = kind.encode()
        if kind == "-NAK" and req.get("delay"):
            payload += b" " + json.dumps({"delay": int(float(req["delay"]) * 1e9)}).encode()
        if kind == "+ACK":
            await self.nc.request(req["reply"], payload, timeout=s.API_TIMEOUT)
        else:
            await self.nc.publish(req["reply"], payload)
            await self.nc.flush(timeout=s.API_TIMEOUT)
        return {}

    async def op_consumer_info(self, req: Json) -> Json:
        try:
            info = await self.js.consumer_info(s.INBOX_STREAM, req["durable"])
        except NotFoundError:
            return {"pending": 0, "ack_pending": 0, "exists": False}
        return {"pending": info.num_pending, "ack_pending": info.num_ack_pending, "exists": True}

    async def op_last(self, req: Json) -> Json:
        """The last message stored on a subject of a stream, or null."""
        try:
            raw = await self.js.get_last_msg(req["stream"], req["subject"])
        except NotFoundError:
            return {"msg": None}
        return {"msg": {"seq": raw.seq, "data": _b(raw.data or b""), "headers": raw.headers}}

    async def op_delete(self, req: Json) -> Json:
        await self.js.delete_msg(req["stream"], int(req["seq"]))
        return {}

    async def op_tail(self, req: Json) -> Json:
        """Up to `limit` of a stream's newest messages (of one subject), newest first."""
        stream, limit, subject = req["stream"], int(req["limit"]), req.get("subject")
        info = await self.js.stream_info(stream)
        out: list[Json] = []
        if subject:  # an inbox: what is still queued, oldest on, by subject
            seq = info.state.first_seq
            while len(out) < 2000:
                try:
                    raw = await self.js.get_msg(stream, seq, subject=subject, next=True)
                except NotFoundError:
                    break
                out.append({"seq": raw.seq, "data": _b(raw.data or b""), "subject": raw.subject})
                seq = raw.seq + 1
            return {"msgs": out[::-1][:limit]}
        seq, probes = info.state.last_seq, 0
        while seq >= max(1, info.state.first_seq) and len(out) < limit and probes < 4 * limit:
            probes += 1
            try:
                raw = await self.js.get_msg(stream, seq)
                out.append({"seq": raw.seq, "data": _b(raw.data or b""), "subject": raw.subject})
            except NotFoundError:
                pass
            seq -= 1
        return {"msgs": out}

    async def op_kv_put(self, req: Json) -> Json:
        kv = self.kv[req["bucket"]]
        value = req["value"].encode()
        if req.get("create"):
            try:
                rev = await kv.create(req["key"], value)
            except KeyWrongLastSequenceError:
                return {"exists": True}
        elif req.get("last") is not None:
            try:
                rev = await kv.update(req["key"], value, last=int(req["last"]))
            except KeyWrongLastSequenceError:
                return {"exists": True}
        else:
            rev = await kv.put(req["key"], value)
        return {"revision": rev}

    async def op_kv_delete(self, req: Json) -> Json:
        await self.kv[req["bucket"]].delete(req["key"])
        return {}

    async def op_kv_get(self, req: Json) -> Json:
        try:
            entry = await self.kv[req["bucket"]].get(req["key"])
        except Exception:
            return {"value": None}
        return {"value": _b(entry.value or b""), "revision": entry.revision}

    async def op_kv_watch(self, req: Json) -> Json:
        """Every key of a bucket now and each change after: pushes `{key, value|null}`; a
        `{"ready": true}` push once the current values are through."""
        watcher = await self.kv[req["bucket"]].watchall()
        rid = req["id"]
        async for entry in watcher:
            if entry is None:
                self.write({"push": rid, "ready": True})
                continue
            gone = entry.operation in ("DEL", "PURGE")
            value = None if gone else _b(entry.value or b"")
            self.write({"push": rid, "key": entry.key, "value": value})
        return {}

    async def op_serve(self, req: Json) -> Json:
        """Requests on `subject` are pushed `{reply, data}`; answered with the `respond` op."""
        rid = req["id"]

        async def got(msg: Any) -> None:
            self.write({"push": rid, "reply": msg.reply, "data": _b(msg.data)})

        sub = await self.nc.subscribe(req["subject"], cb=got)
        try:
            await asyncio.Event().wait()
        finally:
            await sub.unsubscribe()
        return {}

    async def op_publish_core(self, req: Json) -> Json:
        """A plain (not stored) publish: live events for the other hosts' consoles."""
        await self.nc.publish(req["subject"], req["data"].encode())
        return {}

    async def op_respond(self, req: Json) -> Json:
        await self.nc.publish(req["reply"], req["data"].encode())
        return {}

    async def op_request(self, req: Json) -> Json:
        reply = await self.nc.request(
            req["subject"], req["data"].encode(), timeout=float(req["timeout"])
        )
        return {"data": _b(reply.data)}

    async def op_cancel(self, req: Json) -> Json:
        task = self.tasks.get(int(req["target"]))
        if task is not None:
            task.cancel()
        return {}

    # ------------------------------------------------------------------ dispatch

    async def run_one(self, req: Json) -> None:
        rid = req.get("id")
        handler: Callable[[Json], Awaitable[Json]] | None = getattr(
            self, f"op_{req.get('op')}", None
        )
        try:
            if handler is None:
                raise ValueError(f"unknown op {req.get('op')!r}")
            self.write({"id": rid, "ok": await handler(req)})
        except asyncio.CancelledError:
            self.write({"id": rid, "error": "cancelled", "kind": "cancelled"})
        except Exception as exc:
            self.write({"id": rid, "error": f"{type(exc).__name__}: {exc}", "kind": _kind(exc)})
        finally:
            self.tasks.pop(int(rid or 0), None)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return "timeout"
    if isinstance(exc, nats.errors.NoRespondersError):
        return "no_responders"
    if isinstance(exc, NotFoundError):
        return "not_found"
    return "other"


async def main(servers: list[str], name: str, credentials: str | None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=s.MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def write(obj: Json) -> None:
        out.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        out.flush()

    side = Sidecar(servers, name, write, credentials)
    await side.connect()
    write({"id": 0, "ok": {"ready": True}})
    while line := await reader.readline():
        req = json.loads(line)
        task = asyncio.ensure_future(side.run_one(req))
        side.tasks[int(req.get("id", 0))] = task
    # stdin closed: the daemon is gone or stopping.
    for task in list(side.tasks.values()):
        task.cancel()
    await side.nc.drain()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", required=True, help="comma-separated nats:// URLs")
    parser.add_argument("--name", required=True, help="this host's name in the hive")
    parser.add_argument("--credentials", help="a .creds file, or a file holding a token")
    args = parser.parse_args()
    asyncio.run(main([u for u in args.servers.split(",") if u], args.name, args.credentials))


if __name__ == "__main__":
    cli()
