"""Throughput of the msgpipe Python client against raw aio-pika, same broker, same run.

    clients/python/.venv/bin/python clients/python/bench.py [--messages 5000] [--rounds 2]

Makes a vhost on the test node (``scripts/test-broker.sh ensure msgpipe-python 5701``),
provisions the notes pipeline in it with ``target/debug/msgpipe apply`` (a quorum work queue,
as in production), then measures, alternating raw and msgpipe, best of ``--rounds``:

- confirmed publish: persistent messages to the work exchange, ``mandatory``, each publish
  awaited until confirmed, ``--in-flight`` publishes at once (msgpipe: ``Publisher.publish``
  with its outbox open; raw: ``Exchange.publish`` on a confirm channel);
- consume with ack: the queue preloaded with ``--messages`` messages, consumed and acked one by
  one with prefetch 64 (msgpipe: ``Consumer`` with a handler that returns at once; raw:
  ``Queue.consume`` with a callback that acks).

Prints messages per second, this process's CPU time per message (steadier than the rate when
other work shares the host), and the ratios msgpipe / raw. The vhost is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from msgpipe import Consumer, LiveConfig, Message, PipelineConfig, Publisher

REPO = Path(__file__).resolve().parents[2]
MANIFEST = """apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{name: bench, namespace: bench}}
spec:
  broker: {{secretRef: {{name: rabbitmq}}, vhost: "{vhost}"}}
  queue: {{name: bench_queue, type: quorum, exchange: bench, routingKey: bench}}
  retry: {{maxAttempts: 3, backoff: {{initialDelay: 1s, multiplier: 2, maxDelay: 1m}}}}
  deadLetter: {{exchange: bench_dlx, queue: bench_dlq}}
  alerts: {{enabled: false}}
"""


def management(base: str, method: str, path: str, body: Any = None) -> None:
    request = urllib.request.Request(  # noqa: S310 - the local test node
        f"{base}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
    )
    request.add_header("authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=30):  # noqa: S310
        pass


async def publish_raw(uri: str, count: int, in_flight: int) -> Sample:
    connection = await aio_pika.connect(uri)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange("bench", ensure=False)
        body = b"x" * 256

        async def one(i: int) -> None:
            message = aio_pika.Message(
                body, message_id=f"raw-{i}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, "bench", mandatory=True)

        return await timed_window(count, in_flight, one)


async def publish_msgpipe(uri: str, config: PipelineConfig, count: int, in_flight: int) -> Sample:
    with tempfile.TemporaryDirectory() as scratch:
        async with Publisher(uri, config, Path(scratch) / "outbox.sqlite3") as publisher:
            body = b"x" * 256

            async def one(i: int) -> None:
                result = await publisher.publish(body)
                if not result.confirmed:
                    raise RuntimeError("a benchmark publish was queued, not confirmed")

            return await timed_window(count, in_flight, one)


@dataclass(frozen=True)
class Sample:
    rate: float
    """Messages per second (wall clock)."""
    cpu_us: float
    """Microseconds of this process's CPU per message: steadier than the rate on a busy host."""


class Clock:
    """Wall and process CPU time from construction to :meth:`stop`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, count: int) -> Sample:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return Sample(count / wall, cpu * 1e6 / count)


async def timed_window(count: int, in_flight: int, one: Callable[[int], Awaitable[None]]) -> Sample:
    """Runs ``one(i)`` for every i with at most ``in_flight`` at once."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await one(index)

    clock = Clock()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return clock.stop(count)


async def purge_queue(uri: str) -> None:
    connection = await aio_pika.connect(uri)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("bench_queue", ensure=False)
        await queue.purge()


async def consume_raw(uri: str, count: int) -> Sample:
    clock = Clock()  # both sides are timed from connecting to the last ack
    connection = await aio_pika.connect(uri)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=64)
        queue = await channel.get_queue("bench_queue", ensure=False)
        done = asyncio.Event()
        acked = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked == count:
                done.set()

        tag = await queue.consume(on_message)
        await done.wait()
        sample = clock.stop(count)
        await queue.cancel(tag)
        return sample


async def consume_msgpipe(uri: str, config: PipelineConfig, count: int) -> Sample:
    done = asyncio.Event()
    handled = 0

    async def handle(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    consumer = Consumer(uri, LiveConfig.fixed(config), handle, prefetch=64, concurrency=64)
    clock = Clock()
    running = asyncio.create_task(consumer.run())
    await done.wait()
    while consumer.stats.acked < count:  # noqa: ASYNC110 - the last acks, a few loop turns
        await asyncio.sleep(0)
    sample = clock.stop(count)
    consumer.stop()
    stats = await running
    if stats.acked != count:
        raise RuntimeError(f"acked {stats.acked} of {count}")
    return sample


def provision(args: argparse.Namespace, uri: str, vhost: str, mgmt: str) -> PipelineConfig:
    """The bench pipeline applied with ``msgpipe apply``; its pipeline.json from ``render``."""
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "bench.yaml"
        manifest.write_text(MANIFEST.format(vhost=vhost))
        msgpipe = str(args.msgpipe)
        subprocess.run(  # noqa: S603
            [msgpipe, "apply", "-f", str(manifest), "--management-uri", mgmt],
            env=dict(os.environ, MSGPIPE_BROKER_URI=uri),
            check=True,
            capture_output=True,
        )
        rendered = subprocess.run(  # noqa: S603
            [msgpipe, "render", "-f", str(manifest), "-o", "json"],
            check=True,
            capture_output=True,
        )
    docs = json.loads(rendered.stdout)
    docs = docs if isinstance(docs, list) else [docs]
    config_map = next(d for d in docs if d.get("kind") == "ConfigMap")
    return PipelineConfig.from_json(config_map["data"]["pipeline.json"])


async def measure(args: argparse.Namespace, uri: str, config: PipelineConfig) -> None:
    n, window = args.messages, args.in_flight
    results: dict[str, list[Sample]] = {k: [] for k in ("pub-raw", "pub-mp", "con-raw", "con-mp")}
    for _ in range(args.rounds):
        results["pub-raw"].append(await publish_raw(uri, n, window))
        results["pub-mp"].append(await publish_msgpipe(uri, config, n, window))
        await purge_queue(uri)
        await publish_raw(uri, n, 64)
        results["con-raw"].append(await consume_raw(uri, n))
        await publish_raw(uri, n, 64)
        results["con-mp"].append(await consume_msgpipe(uri, config, n))
    rate = {key: max(s.rate for s in samples) for key, samples in results.items()}
    cpu = {key: min(s.cpu_us for s in samples) for key, samples in results.items()}
    print(f"quorum work queue, {n} messages of 256 B, best of {args.rounds} rounds")
    print(f"{'':36}{'raw aio-pika':>13}{'msgpipe':>10}{'msgpipe/raw':>13}")
    rows = (
        (f"confirmed publish ({window} in flight)", "pub-raw", "pub-mp"),
        ("consume with ack (prefetch 64)", "con-raw", "con-mp"),
    )
    for label, raw, mine in rows:
        print(
            f"{label + ', msg/s':36}{rate[raw]:>13,.0f}{rate[mine]:>10,.0f}"
            f"{rate[mine] / rate[raw]:>13.2f}"
        )
        print(
            f"{'  client CPU per message, us':36}{cpu[raw]:>13,.0f}{cpu[mine]:>10,.0f}"
            f"{cpu[mine] / cpu[raw]:>13.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--port", type=int, default=5701)
    parser.add_argument("--msgpipe", type=Path, default=REPO / "target" / "debug" / "msgpipe")
    args = parser.parse_args()
    subprocess.run(  # noqa: S603
        [str(REPO / "scripts" / "test-broker.sh"), "ensure", "msgpipe-python", str(args.port)],
        check=True,
    )
    mgmt = f"http://127.0.0.1:{args.port + 10000}"
    vhost = f"msgpipe-bench-{os.getpid()}"
    quoted = urllib.parse.quote(vhost, safe="")
    uri = f"amqp://guest:guest@127.0.0.1:{args.port}/{quoted}"
    management(mgmt, "PUT", f"/vhosts/{quoted}")
    try:
        grant = {"configure": ".*", "write": ".*", "read": ".*"}
        management(mgmt, "PUT", f"/permissions/{quoted}/guest", grant)
        config = provision(args, uri, vhost, mgmt)
        asyncio.run(measure(args, uri, config))
    finally:
        management(mgmt, "DELETE", f"/vhosts/{quoted}")


if __name__ == "__main__":
    main()
