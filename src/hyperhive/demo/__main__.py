"""`python -m hyperhive.demo`: run the scripted model standalone until interrupted."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import trio

from hyperhive.demo.model import serve_model


async def _run(host: str, port: int, context_limit: int | None) -> None:
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(
            partial(serve_model, host=host, port=port, context_limit=context_limit)
        )
        print(f"scripted model listening on {base_url}", flush=True)
        print(
            f"  ANTHROPIC_BASE_URL={base_url} ANTHROPIC_API_KEY=sk-ant-fake claude ...", flush=True
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hyperhive.demo",
        description="Serve the bundled scripted model (an offline Anthropic Messages API).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8799, help="port, 0 for any (default: %(default)s)"
    )
    parser.add_argument(
        "--context-limit",
        type=int,
        default=None,
        metavar="TOKENS",
        help="answer 'prompt is too long' beyond this many (estimated) tokens (default: none)",
    )
    args = parser.parse_args(argv)
    try:
        trio.run(_run, args.host, args.port, args.context_limit)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
