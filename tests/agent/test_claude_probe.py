"""What the harness reads from claude's stream-json for compaction: the context size of the last
model reply, a compaction's boundary, and the ways claude says the context is full."""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.claude import TurnResult, run_turn
from hyperhive.agent.settings import HarnessSettings

INIT = {"type": "system", "subtype": "init", "session_id": "s"}


def assistant(input_tokens: int, cache_read: int = 0, cache_creation: int = 0) -> object:
    usage = {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_creation,
        "output_tokens": 5,
    }
    return {"type": "assistant", "message": {"content": [], "usage": usage}}


def result(**fields: object) -> object:
    return {"type": "result", "subtype": "success", "is_error": False, **fields}


async def play(tmp_path: Path, *events: object) -> TurnResult:
    """Run a stand-in claude that prints `events` as stream-json lines."""
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in events))
    fake = tmp_path / "claude"
    fake.write_text(f"#!/bin/sh\ncat >/dev/null\ncat {lines}\n")
    fake.chmod(0o755)
    settings = HarnessSettings(
        label="alice", role="agent", state_dir=tmp_path, runtime_dir=tmp_path, claude=str(fake)
    )
    return await run_turn(
        settings, LiveBus(), "hi", model="haiku", resume=True, cancel=trio.CancelScope()
    )


async def test_the_context_is_the_last_replys_input_and_cache_tokens(tmp_path: Path) -> None:
    turn = await play(
        tmp_path,
        INIT,
        assistant(1000),
        assistant(40, cache_read=3000, cache_creation=200),
        assistant(0),  # claude's synthetic error replies carry zeros
        {"type": "assistant", "message": "not a message"},
        result(result="done"),
    )
    assert turn.ok and turn.context_tokens == 3240 and turn.compacted is None


async def test_a_compaction_boundary_gives_the_sizes_before_and_after(tmp_path: Path) -> None:
    boundary = {
        "type": "system",
        "subtype": "compact_boundary",
        "compact_metadata": {"trigger": "manual", "pre_tokens": 5976, "post_tokens": 339},
    }
    turn = await play(tmp_path, boundary, INIT, result(result="", num_turns=0))
    assert turn.ok and turn.compacted == (5976, 339)


async def test_prompt_too_long_in_its_forms(tmp_path: Path) -> None:
    api_400 = result(
        is_error=True,
        api_error_status=400,
        result="Prompt is too long",
        terminal_reason="prompt_too_long",
    )
    assert (await play(tmp_path, INIT, api_400)).too_long
    worded = result(is_error=True, result="API Error: 400 prompt is too long: 9 tokens > 5")
    turn = await play(tmp_path, INIT, worded)
    assert turn.too_long and not turn.ok and not turn.transient
    other = result(is_error=True, api_error_status=400, result="invalid tool schema")
    assert not (await play(tmp_path, INIT, other)).too_long


async def test_a_failed_compaction_tells_its_api_status_in_words(tmp_path: Path) -> None:
    text = "Error during compaction: API Error: 500 scripted api_error. This is a server-side"
    turn = await play(tmp_path, INIT, result(result=text, num_turns=0))
    assert turn.ok and turn.compacted is None and turn.transient and turn.text == text
    quoted = await play(tmp_path, INIT, result(result=f"I saw {text[25:]}", num_turns=1))
    assert quoted.ok and not quoted.transient  # the model's answer is not claude's error
    failed = "Compaction failed · conversation could not be reduced below the context limit"
    turn = await play(tmp_path, INIT, result(result=failed))
    assert turn.compacted is None and not turn.transient and not turn.too_long
