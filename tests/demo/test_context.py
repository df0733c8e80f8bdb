"""The scripted model's context window: the too-long error, summaries, checkpoints."""

from __future__ import annotations

import msgspec
from tests.demo.test_script import REMINDER, counter, envelope, request

from hyperhive.demo.context import (
    COMPACTION_MARKERS,
    answer,
    context_tokens,
    is_compaction,
)
from hyperhive.demo.model import create_app
from hyperhive.demo.script import Failure, Reply, Text, ToolUse

# The tail of claude 2.1.197's `/compact` instructions, as its last text block.
INSTRUCTIONS = (
    "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools.\n\n"
    "Your task is to create a detailed summary of the conversation so far, paying close"
    " attention to the user's explicit requests and your previous actions.\n"
    "REMINDER: Do NOT call any tools. Respond with plain text only — an <analysis> block"
    " followed by a <summary> block."
)


def _history(*bodies: str, last: str = INSTRUCTIONS) -> list[object]:
    messages: list[object] = []
    for body in bodies:
        messages.append({"role": "user", "content": [REMINDER, {"type": "text", "text": body}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "Done."}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": last}]})
    return messages


def test_tokens_are_a_quarter_of_messages_and_system_without_tools() -> None:
    small = msgspec.json.encode({"messages": [], "system": "x" * 400, "tools": ["y" * 4000]})
    assert context_tokens(small) == (2 + 402) // 4
    assert context_tokens(b"not json") == 2


def test_beyond_the_limit_the_api_says_prompt_is_too_long() -> None:
    req = request("hello")
    decision = answer(req, tokens=5000, context_limit=4000, new_id=counter())
    assert decision == Failure(
        400, "invalid_request_error", "prompt is too long: 5000 tokens > 4000 maximum"
    )
    fits = answer(req, tokens=3000, context_limit=4000, new_id=counter())
    assert isinstance(fits, Reply) and isinstance(fits.blocks[0], ToolUse)
    assert answer(req, tokens=10**9, new_id=counter()) == fits  # no limit


def test_a_summarisation_request_is_always_answered_with_a_summary() -> None:
    for marker in COMPACTION_MARKERS:
        req = request(messages=_history(envelope("first"), envelope("second", "bob"), last=marker))
        assert is_compaction(req)
        decision = answer(req, tokens=10**6, context_limit=1000, new_id=counter())
        assert isinstance(decision, Reply) and isinstance(decision.blocks[0], Text)
        summary = decision.blocks[0].text
        assert summary.startswith("<analysis>") and "<summary>" in summary
        assert "2 hive message(s)" in summary and "from bob" in summary
        assert "<hive-message" not in summary
    assert not is_compaction(request("please write a detailed summary"))


def test_nocompact_makes_summarisation_fail_as_too_long() -> None:
    req = request(messages=_history(envelope("!nocompact\nhello")))
    decision = answer(req, tokens=9000, context_limit=None, new_id=counter())
    assert isinstance(decision, Failure) and decision.status == 400
    assert decision.message.startswith("prompt is too long")
    outage = answer(
        request(messages=_history(envelope("!nocompact 500\nhello"))), tokens=9, new_id=counter()
    )
    assert isinstance(outage, Failure) and (outage.status, outage.error_type) == (500, "api_error")
    # The message itself is answered as the rest of its body.
    reply = answer(request("!nocompact\nhello"), tokens=10, new_id=counter())
    assert isinstance(reply, Reply) and isinstance(reply.blocks[0], ToolUse)
    assert reply.blocks[0].input == {"to": "operator", "body": "alice here. You said: hello"}
    reply = answer(request("!nocompact 500\nhello"), tokens=10, new_id=counter())
    assert isinstance(reply, Reply) and isinstance(reply.blocks[0], ToolUse)
    assert reply.blocks[0].input == {"to": "operator", "body": "alice here. You said: hello"}


def test_a_checkpoint_prompt_appends_to_the_notes_with_bash() -> None:
    prompt = '<hive-checkpoint notes="/state/notes.md"/>\nWrite where you are.'
    req = request(messages=_history(envelope("one", "bob"), last=prompt))
    decision = answer(req, tokens=10, new_id=counter())
    assert isinstance(decision, Reply)
    (call,) = decision.blocks
    assert isinstance(call, ToolUse) and call.name == "Bash"
    command = call.input["command"]
    assert isinstance(command, str) and command.endswith(">> /state/notes.md")
    assert "handled 1 message(s); the last from bob" in command


async def test_the_app_enforces_its_context_limit() -> None:
    body = msgspec.json.encode(
        {
            "model": "m",
            "stream": False,
            "system": '<hive-identity name="alice" role="agent"/>',
            "messages": [{"role": "user", "content": envelope("x" * 4000)}],
        }
    )
    client = create_app(context_limit=500).test_client()
    response = await client.post("/v1/messages", data=body)
    assert response.status_code == 400
    error = msgspec.json.decode(await response.get_data(as_text=False), type=dict[str, object])
    assert isinstance(error["error"], dict)
    assert error["error"]["message"].startswith("prompt is too long: ")
    assert response.headers["x-should-retry"] == "false"
    roomy = await create_app(context_limit=5000).test_client().post("/v1/messages", data=body)
    message = msgspec.json.decode(await roomy.get_data(as_text=False), type=dict[str, object])
    assert isinstance(message["usage"], dict)
    assert message["usage"]["input_tokens"] == context_tokens(body)
