"""The seed article's notes service, producer side: publishes notes to the notes pipeline with
the msgpipe publisher (confirms, and a durable outbox when the broker is away).

    clients/python/.venv/bin/python clients/python/examples/notes_producer.py \\
        --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json

Flags (or environment): ``--uri`` (``MSGPIPE_BROKER_URI``), ``--config``
(``MSGPIPE_PIPELINE_CONFIG``), ``--outbox`` (``MSGPIPE_OUTBOX``, default
``target/notes-run/outbox-python.sqlite3``), ``--count`` (notes to send, default 6). Notes whose
text contains "flaky" fail twice in the consumer, "fail" always fails (dead-lettered after
max_attempts), "poison" fails permanently (dead-lettered at once). ``MSGPIPE_LOG`` sets the log
level (default ``WARNING``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from msgpipe import ConfigError, LiveConfig, Outcome, Publisher, PublishError

NOTES = (
    "buy milk",
    "flaky: sync lecture 3 notes",
    "call the dentist",
    "this note will fail every time",
    "poison: {not json",
    "review chapter 7",
)


def say(line: str) -> None:
    """One line on stdout, at once (in order with the log lines, even through a pipe)."""
    print(line, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Publish notes to the notes pipeline.")
    parser.add_argument(
        "--uri",
        default=os.environ.get("MSGPIPE_BROKER_URI", "amqp://guest:guest@127.0.0.1:5673/%2f"),
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("MSGPIPE_PIPELINE_CONFIG", "target/notes-run/pipeline.json"),
    )
    parser.add_argument(
        "--outbox",
        default=os.environ.get("MSGPIPE_OUTBOX", "target/notes-run/outbox-python.sqlite3"),
    )
    parser.add_argument("--count", type=int, default=len(NOTES), help="notes to send")
    return parser.parse_args()


def setup_logging() -> None:
    """The library's warnings (a broker away, a dead letter) on stdout, with UTC times."""
    handler = logging.StreamHandler(sys.stdout)
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=os.environ.get("MSGPIPE_LOG", "WARNING").upper(), handlers=[handler])


async def produce(args: argparse.Namespace) -> None:
    async with LiveConfig.watch(args.config, poll_interval=2.0) as config:
        pipeline = config.current
        say(
            f"producer: pipeline {pipeline.pipeline} -> exchange {json.dumps(pipeline.exchange)}, "
            f"routing key {json.dumps(pipeline.routing_key)}; outbox {args.outbox}"
        )
        async with Publisher(args.uri, config, args.outbox) as publisher:
            if publisher.outbox_size > 0:
                say(
                    f"producer: {publisher.outbox_size} notes saved by an earlier run are "
                    "waiting in the outbox"
                )
            for n in range(args.count):
                text = f"note {n + 1}: {NOTES[n % len(NOTES)]}"
                result = await publisher.publish(text.encode(), content_type="text/plain")
                quoted = json.dumps(text, ensure_ascii=False)
                if result.outcome is Outcome.CONFIRMED:
                    say(f"producer: sent   {result.message_id}  {quoted} (confirmed)")
                else:
                    say(
                        f"producer: saved  {result.message_id}  {quoted} "
                        "(not confirmed yet: in the outbox, resent automatically)"
                    )
            if publisher.outbox_size > 0:
                features = config.features
                say(
                    f"producer: {publisher.outbox_size} notes in the outbox; "
                    f"retry_pending={str(features.retry_pending).lower()} "
                    f"resends every {features.retry_interval_seconds}s"
                )
                loop = asyncio.get_running_loop()
                deadline = loop.time() + features.retry_interval_seconds * 2 + 5
                # The publisher has no "drained" event: watch its outbox size.
                while publisher.outbox_size > 0 and loop.time() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
                say(
                    f"producer: {publisher.outbox_size} notes still in the outbox "
                    "(kept on disk for the next run)"
                )
            say(f"producer: {publisher.stats}")


def main() -> int:
    args = parse_args()
    setup_logging()
    try:
        asyncio.run(produce(args))
    except (ConfigError, PublishError, OSError) as error:
        print(f"notes_producer: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
