"""Unit tests of the scripted model's decision rules."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import msgspec
import pytest

from hyperhive.demo.script import (
    Decision,
    Envelope,
    Failure,
    Identity,
    MessagesRequest,
    Reply,
    Text,
    ToolSpec,
    ToolUse,
    decide,
    find_identity,
    new_tool_use_id,
    parse_envelope,
    request_decoder,
    resolve_tool,
)

TOOLS = [{"name": "Bash"}, {"name": "Read"}, {"name": "mcp__hyperhive__send"}]
REMINDER = {
    "type": "text",
    "text": "<system-reminder>\nToday's date is 2026-11-25.\n</system-reminder>",
}


def identity(name: str = "alice", role: str = "agent") -> str:
    return f'You live in a hive.\n<hive-identity name="{name}" role="{role}"/>\n'


def envelope(body: str, sender: str = "operator") -> str:
    return (
        f'<hive-message from="{sender}" id="12" attempt="1" redelivery="false">\n'
        f"{body}\n</hive-message>\n"
    )


def request(
    body: str | None = None,
    *,
    sender: str = "operator",
    name: str = "alice",
    role: str = "agent",
    messages: Sequence[object] | None = None,
    system: object = None,
    tools: list[object] | None = None,
) -> MessagesRequest:
    """A request shaped like claude's: a list system, a reminder block, then the prompt."""
    if messages is None:
        assert body is not None
        messages = [
            {
                "role": "user",
                "content": [REMINDER, {"type": "text", "text": envelope(body, sender)}],
            }
        ]
    raw = {
        "model": "claude-haiku-4-5",
        "stream": True,
        "max_tokens": 32000,
        "system": system
        if system is not None
        else [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
            {"type": "text", "text": identity(name, role), "cache_control": {"type": "ephemeral"}},
        ],
        "messages": messages,
        "tools": TOOLS if tools is None else tools,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
    }
    return request_decoder.decode(msgspec.json.encode(raw))


def counter() -> Callable[[], str]:
    numbers = itertools.count(1)
    return lambda: f"toolu_{next(numbers)}"


def play(req: MessagesRequest) -> Decision:
    return decide(req, new_id=counter())


def send(to: str, body: str, n: int = 1) -> ToolUse:
    return ToolUse(id=f"toolu_{n}", name="mcp__hyperhive__send", input={"to": to, "body": body})


def text(value: str, delay: float = 0.0) -> Reply:
    return Reply((Text(value),), delay)


# --- parsing ---------------------------------------------------------------------------------


def test_request_decoding_is_tolerant() -> None:
    req = request_decoder.decode(
        b'{"messages": [{"role": "user", "content": "hi", "x": 1}], "y": 2}'
    )
    assert req.messages[0].content == "hi"
    assert req.tools == [] and req.system is None and req.stream is False


def test_find_identity() -> None:
    assert find_identity(["nothing", identity("bob", "manager")]) == Identity("bob", "manager")
    assert find_identity(['<hive-identity role="agent" name="carl" />']) == Identity(
        "carl", "agent"
    )
    assert find_identity(['<hive-identity name="dee" role="king"/>']) == Identity("dee", "agent")
    assert find_identity(["no marker here", '<hive-identity name="" role="agent"/>']) is None


def test_parse_envelope() -> None:
    parsed = parse_envelope("hint: 2 more pending\n" + envelope("line one\nline two") + "bye")
    assert parsed == Envelope(
        sender="operator",
        body="line one\nline two",
        attrs={"from": "operator", "id": "12", "attempt": "1", "redelivery": "false"},
    )
    assert parse_envelope("no envelope") is None


def test_resolve_tool() -> None:
    tools = [ToolSpec("Bash"), ToolSpec("mcp__hive__send"), ToolSpec("mcp__hive__ask")]
    assert resolve_tool("send", tools) == "mcp__hive__send"
    assert resolve_tool("Bash", tools) == "Bash"
    assert resolve_tool("mcp__other__x", tools) == "mcp__other__x"
    assert resolve_tool("send", []) == "mcp__hyperhive__send"


def test_tool_use_ids_are_unique() -> None:
    ids = {new_tool_use_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("toolu_") for i in ids)
    first, second = decide(request('!tools [["send", {}], ["send", {}]]')), decide(request("hi"))
    assert isinstance(first, Reply) and isinstance(second, Reply)
    used = [b.id for b in first.blocks + second.blocks if isinstance(b, ToolUse)]
    assert len(used) == len(set(used)) == 3


# --- rule 1 and 2: after a tool call, side requests --------------------------------------------


def test_after_a_tool_call_the_turn_ends() -> None:
    messages: list[object] = [
        {"role": "user", "content": [REMINDER, {"type": "text", "text": envelope("hi")}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "mcp__hyperhive__send", "input": {}}
            ],
        },
        {"role": "system", "content": "Available agent types: ..."},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "queued"}],
        },
    ]
    decision = play(request(messages=messages))
    assert decision == text("Done.")
    assert isinstance(decision, Reply) and decision.stop_reason == "end_turn"


def test_no_envelope_or_no_identity_says_ok() -> None:
    title = [{"role": "user", "content": "Write a 5-word title for this conversation"}]
    assert play(request(messages=title)) == text("ok")
    assert play(request("hi", system="You are Claude.")) == text("ok")
    assert play(request(messages=[])) == text("ok")


def test_identity_may_come_from_the_messages() -> None:
    prompt = identity("zed") + envelope("hi")
    decision = play(request(system="plain", messages=[{"role": "user", "content": prompt}]))
    assert decision == Reply((send("operator", "zed here. You said: hi"),))


def test_system_role_messages_are_skipped() -> None:
    messages: list[object] = [
        {"role": "user", "content": envelope("hello")},
        {"role": "system", "content": [{"type": "text", "text": "agent listing"}]},
    ]
    assert play(request(messages=messages)) == Reply(
        (send("operator", "alice here. You said: hello"),)
    )


def test_only_the_newest_user_message_counts() -> None:
    messages: list[object] = [
        {"role": "user", "content": [REMINDER, {"type": "text", "text": envelope("first")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
        {"role": "user", "content": envelope("ping there", sender="bob")},
    ]
    assert play(request(messages=messages)) == Reply((send("bob", "pong from alice"),))


def test_a_trailing_assistant_message_says_ok() -> None:
    messages: list[object] = [
        {"role": "user", "content": envelope("hello")},
        {"role": "assistant", "content": "prefill"},
    ]
    assert play(request(messages=messages)) == text("ok")


# --- rule 3: directives ------------------------------------------------------------------------


def test_directive_tool() -> None:
    decision = play(request('!tool send {"to": "bob", "body": "yo"}'))
    assert decision == Reply((send("bob", "yo"),))
    assert isinstance(decision, Reply) and decision.stop_reason == "tool_use"
    bash = play(request('!tool Bash {"command": "true"}'))
    assert bash == Reply((ToolUse(id="toolu_1", name="Bash", input={"command": "true"}),))


def test_directive_tool_with_bad_input_explains() -> None:
    for body in ("!tool send [1, 2]", "!tool send {nope", "!tool"):
        decision = play(request(body))
        assert isinstance(decision, Reply) and decision.stop_reason == "end_turn"
        block = decision.blocks[0]
        assert isinstance(block, Text) and block.text.startswith("!tool: usage")


def test_directive_tools() -> None:
    decision = play(
        request('!tools [["send", {"to": "a", "body": "1"}],\n ["Read", {"file_path": "/x"}]]')
    )
    assert decision == Reply(
        (
            send("a", "1"),
            ToolUse(id="toolu_2", name="Read", input={"file_path": "/x"}),
        )
    )
    for body in ("!tools []", '!tools [["send"]]', "!tools {}", '!tools [["", {}]]'):
        bad = play(request(body))
        assert isinstance(bad, Reply) and bad.stop_reason == "end_turn"


def test_directive_text() -> None:
    assert play(request("!text hello there")) == text("hello there")
    assert play(request("!text first\nsecond")) == text("first\nsecond")
    assert play(request("!text")) == text("Done.")


def test_directive_sleep() -> None:
    assert play(request("!sleep 2.5")) == text("Done.", delay=2.5)
    assert play(request("!sleep 1\n!text late")) == text("late", delay=1.0)
    assert play(request("!sleep 1 !sleep 2 !text later")) == text("later", delay=3.0)
    assert play(request("!sleep 0.5\nhello")) == Reply(
        (send("operator", "alice here. You said: hello"),), delay=0.5
    )
    assert play(request("!sleep 1\n!error 529")) == Failure(
        529, "overloaded_error", "scripted overloaded_error (529)", delay=1.0
    )
    for body in ("!sleep soon", "!sleep -1", "!sleep inf", "!sleep nan"):
        bad = play(request(body))
        assert isinstance(bad, Reply) and bad.delay == 0


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
        (418, "invalid_request_error"),
        (503, "api_error"),
    ],
)
def test_directive_error(status: int, kind: str) -> None:
    assert play(request(f"!error {status}")) == Failure(status, kind, f"scripted {kind} ({status})")


def test_directive_error_retry_and_usage() -> None:
    decision = play(request("!error 500 retry"))
    assert isinstance(decision, Failure) and decision.retry
    for body in (
        "!error",
        "!error 200",
        "!error teapot",
        "!error 500 please",
        "!error 429 until",
        "!error 429 until 0",
        "!error 429 until two",
        "!error 429 until 2 now",
    ):
        bad = play(request(body))
        assert isinstance(bad, Reply) and bad.stop_reason == "end_turn"
        assert isinstance(bad.blocks[0], Text) and bad.blocks[0].text.startswith("!error: usage")


def attempt_of(body: str, attempt: int, *earlier: int) -> MessagesRequest:
    """A prompt at `attempt`, after `earlier` prompts of the same body whose API calls failed:
    claude merges them all into one user message."""
    blocks: list[object] = []
    for n in (*earlier, attempt):
        wrapped = envelope(body).replace('attempt="1"', f'attempt="{n}"')
        blocks += [REMINDER, {"type": "text", "text": wrapped}]
    return request(messages=[{"role": "user", "content": blocks}])


def test_directive_error_until_an_attempt_then_the_rest() -> None:
    body = "!error 429 until 2\nhello"
    assert play(attempt_of(body, 1)) == Failure(
        429, "rate_limit_error", "scripted rate_limit_error (429)"
    )
    answer = Reply((send("operator", "alice here. You said: hello"),))
    assert play(attempt_of(body, 2, 1)) == answer
    assert play(attempt_of(body, 3, 1, 2)) == answer
    retried = play(attempt_of("!error 529 retry until 3", 2, 1))
    assert isinstance(retried, Failure) and retried.retry and retried.status == 529
    assert play(attempt_of("!error 529 retry until 3", 3, 1, 2)) == text("Done.")


# --- rule 4: the demo conversation ---------------------------------------------------------------


def test_operator_gets_an_echo() -> None:
    for role in ("agent", "manager"):
        decision = play(request("hi\nthere, ping", role=role))
        assert decision == Reply((send("operator", "alice here. You said: hi\nthere, ping"),))


SPAWN_TOOLS: list[object] = [
    {"name": "mcp__hyperhive__send"},
    {"name": "mcp__hyperhive__request_spawn"},
]


def request_spawn(n: int = 1) -> ToolUse:
    return ToolUse(
        id=f"toolu_{n}",
        name="mcp__hyperhive__request_spawn",
        input={"name": "scout", "description": "the demo agent: answers the manager's pings"},
    )


def after_tool(call: ToolUse, result: object, *, is_error: bool = False) -> MessagesRequest:
    """The manager's request once `call` returned `result` (claude's shapes: str or blocks)."""
    messages: list[object] = [
        {"role": "user", "content": envelope("The hive is up.", sender="system")},
        {"role": "assistant", "content": [msgspec.to_builtins(call)]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": result,
                    "is_error": is_error,
                }
            ],
        },
    ]
    return request(messages=messages, name="mia", role="manager", tools=SPAWN_TOOLS)


def test_manager_asks_for_the_demo_agent_on_a_plain_system_wake() -> None:
    wake = "The hive is up and you are its manager.\n\nYou were just (re)started."
    decision = play(request(wake, sender="system", name="mia", role="manager", tools=SPAWN_TOOLS))
    assert decision == Reply((request_spawn(),))
    assert isinstance(decision, Reply) and decision.stop_reason == "tool_use"


def test_manager_greets_with_the_approval_to_decide() -> None:
    queued = "spawn of scout queued for the operator as approval #7"
    greeting = (
        "Hello! I'm mia, the manager of this hive. I asked to spawn scout (approval #7): approve"
        " the spawn of scout in the approvals panel or with `hive-c0re approve 7`, and I will"
        " ping scout once it is up. Say hi to your agents with @name in the compose box."
    )
    for result in (queued, [{"type": "text", "text": queued}]):
        decision = play(after_tool(request_spawn(n=41), result))
        assert decision == Reply((send("operator", greeting),))


def test_a_refused_spawn_request_still_greets_and_pings_everyone() -> None:
    refused = "Error: agent 'scout' already exists"
    decision = play(after_tool(request_spawn(n=41), refused, is_error=True))
    greeting = (
        "Hello! I'm mia, the manager of this hive. I could not ask to spawn scout"
        " (Error: agent 'scout' already exists). Say hi to your agents with @name in the"
        " compose box."
    )
    assert decision == Reply(
        (send("operator", greeting), send("*", "ping from mia: who is awake?", n=2))
    )


def test_other_tool_results_end_the_turn() -> None:
    decision = play(after_tool(send("operator", "hi", n=41), "sent to operator (id 3)"))
    assert decision == text("Done.")
    # An agent (not the manager) never follows up, whatever it called.
    messages = after_tool(request_spawn(n=41), "approval #7").messages
    assert play(request(messages=messages, tools=SPAWN_TOOLS)) == text("Done.")


def test_manager_pings_a_spawned_agent() -> None:
    spawned = '{"event":"spawned","agent":"scout","ok":true,"note":"spawned"}'
    decision = play(request(spawned, sender="system", name="mia", role="manager"))
    assert decision == Reply((send("scout", "ping from mia: who is awake?"),))
    failed = '{"event":"spawned","agent":"scout","ok":false,"note":"bwrap: no such file"}'
    decision = play(request(failed, sender="system", name="mia", role="manager"))
    assert decision == Reply((send("operator", "scout did not start: bwrap: no such file"),))


def test_manager_notes_other_hive_events() -> None:
    for body in (
        '{"event":"approval_resolved","agent":"scout","id":7,"status":"deployed"}',
        '{"event":"container_crash","agent":"scout","status":1,"restarts":1}',
    ):
        assert play(request(body, sender="system", role="manager")) == text("Noted.")


def test_agent_notes_system_messages() -> None:
    assert play(request("hive started", sender="system")) == text("Noted.")
    assert play(request("PING?", sender="system")) == text("Noted.")


def test_ping_gets_a_pong() -> None:
    expected = Reply((send("mia", "pong from alice"),))
    assert play(request("ping from mia: who is awake?", sender="mia")) == expected
    assert play(request("PING", sender="mia", role="manager")) == Reply(
        (send("mia", "pong from alice"),)
    )


def test_manager_relays_pongs() -> None:
    decision = play(request("pong from bob", sender="bob", role="manager", name="mia"))
    assert decision == Reply((send("operator", "bob answered me: pong from bob"),))


def test_agents_never_loop_on_pongs_or_chatter() -> None:
    assert play(request("pong from bob", sender="bob")) == text("Noted.")
    assert play(request("thanks!", sender="bob", role="manager")) == text("Noted.")


def test_custom_send_tool_name() -> None:
    decision = play(request("hello", tools=[{"name": "mcp__hive__send"}]))
    assert decision == Reply(
        (
            ToolUse(
                id="toolu_1",
                name="mcp__hive__send",
                input={"to": "operator", "body": "alice here. You said: hello"},
            ),
        )
    )


def test_string_system_prompt() -> None:
    decision = play(request("yo", system=identity("sam")))
    assert decision == Reply((send("operator", "sam here. You said: yo"),))
