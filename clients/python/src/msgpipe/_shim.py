"""The conformance shim (``conformance/SHIM.md``): ``python -m msgpipe._shim``.

Commands arrive on stdin and events leave on stdout, one JSON object per line; the client's
logs go to stderr. Nothing connects before a command asks for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .consumer import Consumer, Message, PermanentError, RetryableError
from .live import LiveConfig
from .publisher import Publisher, PublishError

log = logging.getLogger("msgpipe.shim")


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Shim:
    def __init__(self) -> None:
        self.uri = os.environ["MSGPIPE_URI"]
        self.config_path = os.environ.get("MSGPIPE_PIPELINE_CONFIG")
        self.state_dir = Path(os.environ.get("MSGPIPE_SHIM_STATE_DIR", "."))
        self.poll = int(os.environ.get("MSGPIPE_SHIM_FLAG_POLL_MS", "5000")) / 1000
        self.config: LiveConfig | None = None
        self.publisher: Publisher | None = None
        self.consumer: Consumer | None = None
        self.consuming: asyncio.Task[Any] | None = None

    async def live_config(self) -> LiveConfig:
        if self.config is None:
            self.config = await LiveConfig.watch(self.config_path, poll_interval=self.poll)
        return self.config

    async def started_publisher(self) -> Publisher:
        if self.publisher is None:
            publisher = Publisher(
                self.uri, await self.live_config(), self.state_dir / "outbox.sqlite3"
            )
            self.publisher = await publisher.start()
        return self.publisher

    async def run(self) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        emit({"event": "ready"})
        while line := await reader.readline():
            if not line.strip():
                continue
            try:
                command = json.loads(line)
            except ValueError as error:
                emit({"event": "error", "message": f"bad command: {error}"})
                continue
            if not isinstance(command, dict):
                emit({"event": "error", "message": "bad command: not a JSON object"})
                continue
            try:
                if await self.handle(command):
                    return
            except Exception as error:
                log.exception("command %s failed", command.get("op"))
                emit({"event": "error", "message": f"{type(error).__name__}: {error}"})
        await self.stop()

    async def handle(self, command: dict[str, Any]) -> bool:
        """Runs one command; True when the shim should exit."""
        match command.get("op"):
            case "publish":
                await self.publish(command)
            case "start_publisher":
                publisher = await self.started_publisher()
                emit({"event": "publisher_started", "outbox": publisher.stats.outbox_at_start})
            case "consume":
                await self.consume(command)
            case "stop":
                await self.stop()
                emit({"event": "stopped"})
                return True
            case other:
                emit({"event": "error", "message": f"unknown op {other!r}"})
        return False

    async def publish(self, command: dict[str, Any]) -> None:
        message_id = command.get("id")
        publisher = await self.started_publisher()
        headers = command.get("headers") or {}
        try:
            result = await publisher.publish(
                str(command.get("body", "")).encode(),
                message_id=None if message_id is None else str(message_id),
                headers={str(k): str(v) for k, v in headers.items()},
            )
        except PublishError as error:
            emit({"event": "published", "id": message_id, "result": "error", "error": str(error)})
            return
        emit({"event": "published", "id": message_id, "result": result.outcome.value})

    async def consume(self, command: dict[str, Any]) -> None:
        if self.consumer is not None:
            emit({"event": "error", "message": "already consuming"})
            return
        script: dict[str, list[str]] = command.get("script") or {}
        default: list[str] = command.get("default") or ["ok"]

        async def handler(message: Message) -> None:
            steps = script.get(message.message_id or "", default) or ["ok"]
            outcome = steps[min(message.attempt, len(steps)) - 1]
            emit(
                {
                    "event": "delivery",
                    "id": message.message_id,
                    "attempt": message.attempt,
                    "redelivered": message.redelivered,
                    "outcome": outcome,
                }
            )
            await act(outcome)

        self.consumer = Consumer(self.uri, await self.live_config(), handler)
        self.consuming = asyncio.create_task(self.consumer.run())
        consuming = asyncio.ensure_future(self.consumer.wait_consuming())
        await asyncio.wait({consuming, self.consuming}, return_when=asyncio.FIRST_COMPLETED)
        consuming.cancel()
        emit({"event": "consuming"})

    async def stop(self) -> None:
        if self.consumer is not None and self.consuming is not None:
            self.consumer.stop()
            await self.consuming
        if self.publisher is not None:
            await self.publisher.close()
        if self.config is not None:
            await self.config.aclose()


async def act(outcome: str) -> None:
    match outcome:
        case "ok":
            return
        case "retry":
            raise RetryableError("scripted retry")
        case "permanent":
            raise PermanentError("scripted permanent")
        case "throw":
            raise RuntimeError("scripted throw")
        case "hang":
            await asyncio.Event().wait()
        case _ if outcome.startswith("sleep:"):
            await asyncio.sleep(int(outcome.removeprefix("sleep:")) / 1000)
        case _:
            raise RuntimeError(f"unknown scripted outcome {outcome!r}")


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    asyncio.run(Shim().run())


if __name__ == "__main__":
    main()
