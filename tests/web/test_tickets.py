"""Stream tickets: one path, once, for a short while, and only while their token is the UI's."""

from __future__ import annotations

from dataclasses import dataclass

from hyperhive.web.security import Guard
from hyperhive.web.tickets import TICKET_SECONDS, Tickets


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_opens_its_path_once() -> None:
    tickets = Tickets(clock=FakeClock())
    ticket = tickets.issue("/events/stream", "tok")
    assert tickets.redeem(ticket, "/events/stream") == "tok"
    assert tickets.redeem(ticket, "/events/stream") is None
    assert len(tickets) == 0


def test_a_ticket_is_bound_to_its_path_and_spent_by_a_wrong_one() -> None:
    tickets = Tickets(clock=FakeClock())
    ticket = tickets.issue("/ws", "tok")
    assert tickets.redeem(ticket, "/dashboard/stream") is None
    assert tickets.redeem(ticket, "/ws") is None  # the wrong attempt used it up
    assert tickets.redeem("never-issued", "/ws") is None
    assert tickets.redeem("", "/ws") is None


def test_a_ticket_expires() -> None:
    clock = FakeClock()
    tickets = Tickets(clock=clock)
    early, late = tickets.issue("/ws", "tok"), tickets.issue("/ws", "tok")
    clock.now += TICKET_SECONDS - 0.001
    assert tickets.redeem(early, "/ws") == "tok"
    clock.now += 0.001
    assert tickets.redeem(late, "/ws") is None
    # Expired tickets do not pile up: the next issue clears them.
    stale = [tickets.issue("/ws", "tok") for _ in range(5)]
    clock.now += TICKET_SECONDS
    tickets.issue("/ws", "tok")
    assert len(tickets) == 1
    assert all(tickets.redeem(t, "/ws") is None for t in stale)


def test_outstanding_tickets_are_capped() -> None:
    tickets = Tickets(clock=FakeClock(), limit=3)
    issued = [tickets.issue("/ws", f"tok{i}") for i in range(5)]
    assert len(tickets) == 3
    assert [tickets.redeem(t, "/ws") for t in issued] == [None, None, "tok2", "tok3", "tok4"]


def test_tickets_are_unguessable() -> None:
    tickets = Tickets()
    issued = {tickets.issue("/ws", "tok") for _ in range(100)}
    assert len(issued) == 100
    assert all(len(t) >= 43 for t in issued)


@dataclass
class SwitchingToken:
    """A UI whose token changes (an agent's, after its daemon restarted with a new secret)."""

    token: str

    async def current_token(self) -> str:
        return self.token


async def test_a_ticket_dies_with_its_token() -> None:
    login = SwitchingToken("before-the-restart")
    guard = Guard.create(login_token=login)
    assert await guard.admitted("Bearer before-the-restart", None, "/ws")
    ticket = guard.tickets.issue("/ws", "before-the-restart")
    login.token = "after-the-restart"
    assert not await guard.admitted(None, ticket, "/ws")
    assert not await guard.admitted("Bearer before-the-restart", None, "/ws")
    fresh = guard.tickets.issue("/ws", "after-the-restart")
    assert await guard.admitted(None, fresh, "/ws")
