"""The seed article's notes service, consumer side: a handler that saves notes, with the msgpipe
retry protocol around it. It prints every attempt, the backoff delay each retried note actually
waited, and what gets dead-lettered.

    clients/python/.venv/bin/python clients/python/examples/notes_consumer.py \\
        --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json

The handler: a note containing "flaky" fails on its first two attempts, "fail" fails every time
(the consumer dead-letters it after max_attempts), "poison" fails permanently (straight to the
DLQ); anything else is saved. Flags (or environment): ``--uri`` (``MSGPIPE_BROKER_URI``),
``--config`` (``MSGPIPE_PIPELINE_CONFIG``), ``--idle-exit SECONDS`` (stop after this long without
a message; default: the longest retry delay + 5 s; 0 = run until Ctrl-C). ``MSGPIPE_LOG`` sets
the log level (default ``WARNING``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime

from msgpipe import (
    ConfigError,
    Consumer,
    DeadLetter,
    HandlerError,
    LiveConfig,
    Message,
    PermanentError,
    Retry,
    RetryableError,
    headers,
)


def say(line: str) -> None:
    """One line on stdout, at once (in order with the log lines, even through a pipe)."""
    print(line, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Consume the notes pipeline's work queue.")
    parser.add_argument(
        "--uri",
        default=os.environ.get("MSGPIPE_BROKER_URI", "amqp://guest:guest@127.0.0.1:5673/%2f"),
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("MSGPIPE_PIPELINE_CONFIG", "target/notes-run/pipeline.json"),
    )
    parser.add_argument(
        "--idle-exit",
        type=int,
        default=None,
        metavar="SECONDS",
        help="stop after this long without a message (default: the longest retry delay + 5 s; "
        "0 = run until Ctrl-C)",
    )
    return parser.parse_args()


def setup_logging() -> None:
    """The library's warnings (a dead letter, a lost connection) on stdout, with UTC times."""
    handler = logging.StreamHandler(sys.stdout)
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=os.environ.get("MSGPIPE_LOG", "WARNING").upper(), handlers=[handler])


def save_note(text: str, attempt: int) -> None:
    """The notes service's own work: save the note (here: decide by its text)."""
    if "poison" in text:
        raise PermanentError("cannot parse the note")
    if "fail" in text:
        raise RetryableError("notes database refused the write")
    if "flaky" in text and attempt <= 2:
        raise RetryableError("sync service timed out")


def next_step(message: Message, error: HandlerError) -> str:
    """What the consumer will do with a failure, for the printout."""
    match message.failure_destination(error):
        case Retry(tier=tier, delay=delay):
            return f"retry tier {tier} in {delay:.1f}s"
        case DeadLetter(reason=reason):
            return f"DEAD-LETTERED ({reason})"


def waited(message: Message) -> str:
    """How long the message waited since its last failure (the backoff actually seen)."""
    last = message.header_time(headers.LAST_FAILURE)
    if last is None:
        return ""
    wait = (datetime.now(UTC) - last).total_seconds()
    return f", waited {wait:.2f}s since the last failure" if wait >= 0 else ""


class Notes:
    """The handler, and when it last saw a message (for --idle-exit)."""

    def __init__(self) -> None:
        self.last_activity = time.monotonic()

    async def handle(self, message: Message) -> None:
        self.last_activity = time.monotonic()
        text = message.body.decode("utf-8", errors="replace")
        attempt = f"attempt {message.attempt}/{message.max_attempts}"
        quoted = json.dumps(text, ensure_ascii=False)
        prefix = f"consumer: {message.message_id or '?'} {attempt} {quoted}"
        try:
            save_note(text, message.attempt)
        except HandlerError as error:
            say(f"{prefix}: failed ({error}){waited(message)} -> {next_step(message, error)}")
            raise
        say(f"{prefix}: saved{waited(message)}")


async def stop_when_idle(consumer: Consumer, notes: Notes, idle_exit: int) -> None:
    while True:
        await asyncio.sleep(0.25)
        if time.monotonic() - notes.last_activity > idle_exit:
            say(f"consumer: no message for {idle_exit}s, stopping")
            consumer.stop()
            return


async def consume(args: argparse.Namespace) -> None:
    async with LiveConfig.watch(args.config, poll_interval=2.0) as config:
        pipeline = config.current
        delays = [tier.delay_ms for tier in pipeline.retry.tiers]
        idle_exit: int = (
            args.idle_exit if args.idle_exit is not None else max(delays, default=0) // 1000 + 5
        )
        say(
            f"consumer: queue {json.dumps(pipeline.queue)}, {pipeline.max_attempts} attempts, "
            f"tiers [{', '.join(map(str, delays))}] ms, "
            f"DLQ {json.dumps(pipeline.dead_letter.queue)}"
        )
        notes = Notes()
        consumer = Consumer(args.uri, config, notes.handle)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, consumer.stop)
        watchdog = (
            asyncio.create_task(stop_when_idle(consumer, notes, idle_exit))
            if idle_exit > 0
            else None
        )
        stats = await consumer.run()
        if watchdog is not None:
            watchdog.cancel()
        say(
            f"consumer: saved {stats.acked}, retried {stats.retried}, "
            f"dead-lettered {stats.dead_lettered}, requeued {stats.requeued}"
        )


def main() -> int:
    args = parse_args()
    setup_logging()
    try:
        asyncio.run(consume(args))
    except (ConfigError, OSError) as error:
        print(f"notes_consumer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
