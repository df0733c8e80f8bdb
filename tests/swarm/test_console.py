"""One hive across hosts, through the sockets: peer questions between hosts, questions and
approvals of every host in every host's lists and event streams (bubblewrap: agents are spawned,
then stopped, so the test speaks for them on their sockets)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import Conflict
from hyperhive.swarm import subjects as s
from hyperhive.swarm.cluster import Cluster
from tests.conftest import needs_bwrap
from tests.hive import subscription, wait_for_event
from tests.swarm.conftest import open_hosts

pytestmark = [needs_bwrap]


async def test_a_peer_question_across_hosts_is_asked_answered_and_seen_everywhere(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_hosts(hive_root, cluster, ("h1", "h2"), demo=False) as hosts:
        h1, h2 = hosts["h1"], hosts["h2"]
        for name, host in (("alice", "h1"), ("bob", "h2")):
            await h1.call(wire.Spawn(name=name, host=host))
            await h1.call(wire.Kill(name=name))  # its socket stays: we speak for it
        alice, bob = h1.agent_sock("alice"), h2.agent_sock("bob")
        for sock in (alice, bob):
            while (await call_once(sock, wire.Recv())).message is not None:
                pass  # the spawn notice
        async with subscription(h2.sock) as on_h2:
            asked = await call_once(alice, wire.Ask(question="ready?", to="bob"))
            assert asked.id // s.ID_SPAN == 1, "in the range of h1 (the first host up)"
            # The question lives on h1; h2's console sees it too (the hosts share events).
            seen = await wait_for_event(
                on_h2, lambda e: isinstance(e, wire.QuestionChanged) and e.question.id == asked.id
            )
            assert isinstance(seen, wire.QuestionChanged) and seen.question.target == "bob"
            listed = await h2.call(wire.ListQuestions())
            assert [q.id for q in listed.questions] == [asked.id]

            got = await call_once(bob, wire.Recv(wait_seconds=10))
            assert got.message is not None and got.message.sender == "system"
            event = msgspec.json.decode(got.message.body)
            assert (event["event"], event["id"], event["agent"]) == (
                "question_asked",
                asked.id,
                "alice",
            )
            # bob answers on his own host; the answer is made where the question lives.
            answered = await call_once(bob, wire.Answer(id=asked.id, answer="yes"))
            assert (answered.question.answer, answered.question.answerer) == ("yes", "bob")
            with pytest.raises(Conflict, match="already resolved"):
                await call_once(bob, wire.Answer(id=asked.id, answer="no"))
        back = await call_once(alice, wire.Recv(wait_seconds=10))
        assert back.message is not None
        told = msgspec.json.decode(back.message.body)
        assert (told["event"], told["answer"], told["answerer"]) == (
            "question_answered",
            "yes",
            "bob",
        )
        assert (await h1.call(wire.ListQuestions())).questions == []
