"""The hive's Prometheus metrics (SPEC §7.4), read at scrape time from the daemon's own state.

The daemon answers host `metrics` with the exposition text; the dashboard serves it as
`GET /metrics` (with the login token), so a scraper needs no access to host.sock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hyperhive.core.agents import Registry
from hyperhive.core.approval_queue import ApprovalQueue
from hyperhive.core.broker import MessageBroker
from hyperhive.core.turns import Turns
from hyperhive.protocol import wire


class _Snapshot(Collector):
    """Metric families built from one snapshot of the hive (the collector API is synchronous)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class HiveMetrics:
    def __init__(
        self, registry: Registry, broker: MessageBroker, turns: Turns, queue: ApprovalQueue
    ) -> None:
        self.registry = registry
        self.broker = broker
        self.turns = turns
        self.queue = queue

    async def render(self) -> bytes:
        """The exposition text (prometheus-client's text format) of the hive as it is now."""
        now = time.time()
        infos = self.registry.infos(self.broker.queued)
        states, oldest = await self.broker.census()
        pending = await self.queue.rows("status = 'pending'")
        stats = [await self.turns.stats(name) for name in await self.turns.agents()]
        families: list[Metric] = [
            *self._agents(infos, oldest, now),
            *self._turns(stats),
            self._messages(states),
            GaugeMetricFamily(
                "hive_approvals_pending", "Approvals waiting for the operator.", value=len(pending)
            ),
            *self.broker.commit_seconds.collect(),
            *self.broker.batch_ops.collect(),
        ]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(families))
        return generate_latest(registry)

    def _agents(
        self, infos: list[wire.AgentInfo], oldest: dict[str, float], now: float
    ) -> list[Metric]:
        by_state = GaugeMetricFamily("hive_agents", "Agents by container state.", labels=["state"])
        for state, n in sorted(Counter(i.state for i in infos).items()):
            by_state.add_metric([state], n)
        attention = GaugeMetricFamily(
            "hive_agents_attention", "Agents by attention state.", labels=["attention"]
        )
        for need, count in sorted(Counter(i.attention for i in infos).items()):
            attention.add_metric([need], count)
        unread = GaugeMetricFamily(
            "hive_agent_unread", "Messages queued for the agent.", labels=["agent"]
        )
        age = GaugeMetricFamily(
            "hive_agent_oldest_unread_seconds",
            "Age of the oldest message queued for the agent (0: none).",
            labels=["agent"],
        )
        for info in infos:
            inbox = "manager" if info.role == "manager" else info.name
            unread.add_metric([info.name], info.unread)
            sent_at = oldest.get(inbox)
            age.add_metric([info.name], 0.0 if sent_at is None else max(now - sent_at, 0.0))
        return [by_state, attention, unread, age]

    def _turns(self, stats: list[wire.AgentStats]) -> list[Metric]:
        turns = CounterMetricFamily("hive_turns", "Turns recorded per agent.", labels=["agent"])
        tokens = CounterMetricFamily(
            "hive_tokens", "Tokens of recorded turns per agent.", labels=["agent", "kind"]
        )
        cost = CounterMetricFamily(
            "hive_cost_usd", "Cost of recorded turns per agent (USD).", labels=["agent"]
        )
        for s in stats:
            total = s.total
            turns.add_metric([s.name], total.turns)
            for kind, n in (
                ("input", total.input_tokens),
                ("output", total.output_tokens),
                ("cache_read", total.cache_read_tokens),
                ("cache_write", total.cache_write_tokens),
            ):
                tokens.add_metric([s.name, kind], n)
            cost.add_metric([s.name], total.cost_usd)
        return [turns, tokens, cost]

    @staticmethod
    def _messages(states: dict[str, int]) -> Metric:
        family = GaugeMetricFamily(
            "hive_messages",
            "Messages the broker holds, by state (delivered ones until they are vacuumed).",
            labels=["state"],
        )
        for state in ("queued", "leased", "delivered", "dead"):
            family.add_metric([state], states.get(state, 0))
        return family
