"""``python -m msgpipe._shim`` speaks conformance/SHIM.md."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, Amqp, Pipeline

pytestmark = pytest.mark.broker


class ShimProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()

    async def expect(self, event: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = await self.process.stdout.readline()
                assert line, f"the shim exited before {event} {fields}: {self.events}"
                data: dict[str, Any] = json.loads(line)  # stdout holds JSON lines only
                self.events.append(data)
                if data.get("event") == event and all(data.get(k) == v for k, v in fields.items()):
                    return data


async def test_the_shim_publishes_consumes_by_script_and_stops(
    pipeline: Pipeline, amqp: Amqp, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        MSGPIPE_URI=pipeline.uri,
        MSGPIPE_PIPELINE_CONFIG=str(pipeline.config_path),
        MSGPIPE_SHIM_STATE_DIR=str(tmp_path),
        MSGPIPE_SHIM_FLAG_POLL_MS="200",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "msgpipe._shim",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    shim = ShimProcess(process)
    await shim.expect("ready")
    await shim.send({"op": "start_publisher"})
    assert (await shim.expect("publisher_started"))["outbox"] == 0
    await shim.send({"op": "publish", "id": "m1", "body": "one", "headers": {"k": "v"}})
    await shim.expect("published", id="m1", result="confirmed")
    await shim.send({"op": "publish", "id": "m2", "body": "two"})
    await shim.expect("published", id="m2", result="confirmed")
    await shim.send({"op": "bogus"})
    await shim.expect("error")
    await shim.send(
        {"op": "consume", "script": {"m1": ["retry", "ok"], "m2": ["throw", "permanent"]}}
    )
    await shim.expect("consuming")
    await shim.expect("delivery", id="m1", attempt=2, outcome="ok", redelivered=False)
    await shim.expect("delivery", id="m2", attempt=2, outcome="permanent")
    await shim.send({"op": "stop"})
    await shim.expect("stopped")
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert "guest:guest" not in logs
    deliveries = [e for e in shim.events if e["event"] == "delivery"]
    assert {(e["id"], e["attempt"], e["outcome"]) for e in deliveries} == {
        ("m1", 1, "retry"),
        ("m1", 2, "ok"),
        ("m2", 1, "throw"),
        ("m2", 2, "permanent"),
    }
    (letter,) = await amqp.drain("notes_dlq")
    assert letter.message_id == "m2"
    assert letter.headers["x-msgpipe-reason"] == "permanent"
