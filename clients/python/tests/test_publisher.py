"""The publisher and its outbox against a real RabbitMQ 4.3 node."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from msgpipe import Outcome, Publisher, headers

from .conftest import PORT, Amqp, MakePipeline, Pipeline, broker_script, eventually, mgmt, quote

pytestmark = pytest.mark.broker


def publisher_connections(vhost: str) -> int:
    return sum(
        1
        for c in mgmt("GET", f"/vhosts/{quote(vhost)}/connections") or []
        if c.get("client_properties", {}).get("connection_name") == "msgpipe-publisher"
    )


async def ids_in(amqp: Amqp, queue: str) -> list[str | None]:
    return [m.message_id for m in await amqp.drain(queue)]


async def test_the_first_publish_is_confirmed_with_a_time_ordered_id(
    pipeline: Pipeline, amqp: Amqp, tmp_path: Path
) -> None:
    async with Publisher(pipeline.uri, pipeline.config, tmp_path / "outbox") as publisher:
        first = await publisher.publish(
            b"hello", headers={"tenant": "t"}, content_type="text/plain"
        )
        second = await publisher.publish(b"again", message_id="mine")
        assert first.outcome is Outcome.CONFIRMED
        assert second.confirmed
        assert publisher.outbox_size == 0
    (one, two) = await amqp.drain("notes_queue")
    assert uuid.UUID(first.message_id).version == 7
    assert (one.message_id, two.message_id) == (first.message_id, "mine")
    assert (one.delivery_mode, one.content_type) == (2, "text/plain")
    assert one.headers == {"tenant": "t"}


async def test_a_publisher_started_before_its_pipeline_delivers_within_seconds_of_apply(
    make_pipeline: MakePipeline, amqp: Amqp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = make_pipeline(apply=False)  # the vhost exists, the exchange does not
    caplog.set_level(logging.DEBUG, logger="msgpipe")
    async with Publisher(pipeline.uri, pipeline.config, tmp_path / "outbox") as publisher:
        results = [await publisher.publish(b"early", message_id=f"e-{i}") for i in range(3)]
        assert [r.outcome for r in results] == [Outcome.QUEUED] * 3
        # The figure: started 30 s before the pipeline. Probes back off 0.5, 1, 2, then
        # every 4 s (the cap): about 9, and the cap is what keeps the delivery within 5 s.
        await asyncio.sleep(30)
        waiting = [r for r in caplog.records if r.name.startswith("msgpipe")]
        probes = publisher.stats.route_probes
        assert probes >= 5, "the route is probed on a backoff"
        assert probes <= 12, f"{probes} probes in 30 s: no hot loop"

        applied = time.monotonic()
        await pipeline.apply_async()
        took = await eventually(
            lambda: publisher.outbox_size == 0, within=10, what="the outbox delivered"
        )
        delivered_after = time.monotonic() - applied
        late = await publisher.publish(b"late", message_id="e-3")
        assert late.confirmed
        assert publisher.stats.connections == 1, "a 404 reopens the channel, not the connection"
        await eventually(  # the management API lists connections after a stats interval
            lambda: asyncio.to_thread(publisher_connections, pipeline.vhost),
            within=5,
            what="the publisher's connection listed",
        )
        assert await asyncio.to_thread(publisher_connections, pipeline.vhost) == 1
    print(f"delivered {delivered_after:.2f} s after apply; {probes} probes before")
    assert delivered_after <= 5.0, f"delivered {delivered_after:.1f} s after apply ({took:.1f})"
    assert await ids_in(amqp, "notes_queue") == ["e-0", "e-1", "e-2", "e-3"]
    missing = [r for r in waiting if "does not exist in vhost" in r.getMessage()]
    assert len(missing) == 1, [r.getMessage() for r in waiting]
    assert missing[0].levelno == logging.WARNING
    assert f"exchange notes does not exist in vhost {pipeline.vhost}" in missing[0].getMessage()
    assert len([r for r in waiting if r.name == "msgpipe.publisher"]) <= 2, (
        "no log line per probe: " + repr([r.getMessage() for r in waiting])
    )
    assert "guest:guest" not in caplog.text


async def test_returned_messages_wait_in_the_outbox_until_a_queue_is_bound(
    pipeline: Pipeline, amqp: Amqp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await amqp.channel.queue_delete("notes_queue")  # the exchange stays, unbound
    caplog.set_level(logging.WARNING, logger="msgpipe")
    async with Publisher(pipeline.uri, pipeline.config, tmp_path / "outbox") as publisher:
        assert (await publisher.publish(b"r", message_id="u-0")).queued
        assert (await publisher.publish(b"r", message_id="u-1")).queued
        await asyncio.sleep(2)
        await pipeline.apply_async()
        await eventually(lambda: publisher.outbox_size == 0, within=5, what="resent")
    assert await ids_in(amqp, "notes_queue") == ["u-0", "u-1"]
    returned = [r for r in caplog.records if "routes key 'notes' to no queue" in r.getMessage()]
    assert len(returned) == 1


KILLED_PUBLISHER = """
import asyncio, sys
from msgpipe import PipelineConfig, Publisher

async def main() -> None:
    config = PipelineConfig.from_path(sys.argv[2])
    async with Publisher(sys.argv[1], config, sys.argv[3], connect_timeout=0.5) as publisher:
        for i in range(100_000):
            result = await publisher.publish(b"body %d" % i, message_id=f"k-{i:06d}")
            print(result.message_id, result.outcome.value, flush=True)

asyncio.run(main())
"""


async def test_queued_messages_survive_kill_9_and_are_sent_in_order_on_the_next_start(
    pipeline: Pipeline, amqp: Amqp, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    script = tmp_path / "publisher.py"
    script.write_text(KILLED_PUBLISHER)
    unreachable = "amqp://guest:guest@127.0.0.1:1/%2f"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        unreachable,
        str(pipeline.config_path),
        str(outbox),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert child.stdout is not None
    reported: list[str] = []
    while len(reported) < 40:
        line = await child.stdout.readline()
        assert line, "the publisher died early"
        message_id, outcome = line.decode().split()
        assert outcome == "queued"
        reported.append(message_id)
    child.send_signal(signal.SIGKILL)  # mid-stream: more publishes are in flight
    assert await child.wait() == -signal.SIGKILL

    async with Publisher(pipeline.uri, pipeline.config, outbox) as publisher:
        assert publisher.stats.outbox_at_start >= 40
        newest = await publisher.publish(b"after the restart", message_id="z-after")
        assert newest.queued, "a new message queues behind a non-empty outbox"
        await eventually(lambda: publisher.outbox_size == 0, within=10, what="outbox sent")
    sent = await ids_in(amqp, "notes_queue")
    assert sent[:40] == reported, "every message reported queued survived, in order"
    assert sent == sorted(str(i) for i in sent), "in publish order, the new one last"
    assert sent[-1] == "z-after"
    assert len(sent) == len(set(sent))


async def test_the_outbox_drains_after_a_broker_restart(
    pipeline: Pipeline, amqp: Amqp, tmp_path: Path
) -> None:
    await amqp.connection.close()
    async with Publisher(pipeline.uri, pipeline.config, tmp_path / "outbox") as publisher:
        assert (await publisher.publish(b"before", message_id="b-0")).confirmed
        await asyncio.to_thread(broker_script, "stop")
        try:
            outcomes = [
                (await publisher.publish(b"down", message_id=f"b-{i}")).outcome for i in range(1, 6)
            ]
        finally:
            await asyncio.to_thread(broker_script, "ensure")
        assert outcomes == [Outcome.QUEUED] * 5
        await eventually(lambda: publisher.outbox_size == 0, within=30, what="outbox drained")
        assert publisher.stats.connections == 2
        assert (await publisher.publish(b"after", message_id="b-6")).confirmed
    import aio_pika

    connection = await aio_pika.connect(pipeline.uri)
    async with connection:
        fresh = Amqp(connection, await connection.channel())
        assert await ids_in(fresh, "notes_queue") == [f"b-{i}" for i in range(7)]


async def test_retry_pending_off_parks_the_outbox_and_on_resends_it(
    make_pipeline: MakePipeline, amqp: Amqp, tmp_path: Path
) -> None:
    from msgpipe import LiveConfig

    pipeline = make_pipeline(apply=False, retry_pending=False, retry_interval_seconds=1)
    async with (
        LiveConfig.watch(pipeline.config_path, poll_interval=0.1) as live,
        Publisher(pipeline.uri, live, tmp_path / "outbox") as publisher,
    ):
        parked = await publisher.publish(b"parked", message_id="f-0")
        assert parked.queued
        await pipeline.apply_async()
        fresh = await publisher.publish(b"fresh", message_id="f-1")
        assert fresh.confirmed, "fresh messages go straight on while the outbox is parked"
        await asyncio.sleep(2.5)  # > 2 retry intervals of 1 s
        assert publisher.outbox_size == 1, "parked: not resent"
        assert publisher.stats.resent == 0

        pipeline.write_features(retry_pending=True, retry_interval_seconds=30)
        took = await eventually(
            lambda: publisher.outbox_size == 0, within=5, what="resent once switched on"
        )
        assert took < 2
        assert live.features.retry_interval_seconds == 30
    assert await ids_in(amqp, "notes_queue") == ["f-1", "f-0"]


async def test_a_copy_keeps_its_id_across_the_outbox(pipeline: Pipeline, tmp_path: Path) -> None:
    """Messages resent from the outbox keep message id, body, headers and properties."""
    from msgpipe import Properties

    pipeline_down = Publisher(
        "amqp://guest:guest@127.0.0.1:1/%2f", pipeline.config, tmp_path / "o", connect_timeout=0.3
    )
    async with pipeline_down as publisher:
        result = await publisher.publish(
            b"\x00binary",
            message_id="keep-1",
            properties=Properties(correlation_id="c", expiration="600000", priority=2),
            headers={"n": 5, headers.REPLAY_COUNT: 1},
        )
        assert result.queued
    import aio_pika

    async with Publisher(pipeline.uri, pipeline.config, tmp_path / "o") as publisher:
        await eventually(lambda: publisher.outbox_size == 0, within=10, what="resent")
    connection = await aio_pika.connect(pipeline.uri)
    async with connection:
        (message,) = await Amqp(connection, await connection.channel()).drain("notes_queue")
    assert (message.message_id, message.body, message.correlation_id) == (
        "keep-1",
        b"\x00binary",
        "c",
    )
    assert message.headers == {"n": 5, headers.REPLAY_COUNT: 1}
    assert (message.expiration, message.priority, message.delivery_mode) == (600.0, 2, 2)


async def test_idle_clients_do_not_spin(pipeline: Pipeline, tmp_path: Path) -> None:
    """A connected consumer and publisher, and an offline publisher with a non-empty outbox,
    wait on events and timers: next to no CPU while nothing happens."""
    import resource

    from msgpipe import Consumer, Message

    async def handle(message: Message) -> None:
        return None

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    offline = Publisher(
        "amqp://guest:guest@127.0.0.1:1/%2f", pipeline.config, tmp_path / "o1", connect_timeout=0.3
    )
    async with (
        Consumer(pipeline.uri, pipeline.config, handle) as consumer,
        Publisher(pipeline.uri, pipeline.config, tmp_path / "o2") as publisher,
        offline,
    ):
        await consumer.wait_consuming()
        assert (await publisher.publish(b"x")).confirmed
        assert (await offline.publish(b"y")).queued
        before = cpu()
        await asyncio.sleep(2)
        used = cpu() - before
    assert used < 0.2, f"{used:.2f} s of CPU in 2 s of idling"


async def test_amqps_with_the_ca_file_is_confirmed_and_without_it_stays_offline(
    pipeline: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from .conftest import CERTS, TLS_PORT

    uri = pipeline.uri.replace("amqp://", "amqps://").replace(f":{PORT}/", f":{TLS_PORT}/")
    ca = str(CERTS / "ca.crt")
    async with Publisher(uri, pipeline.config, tmp_path / "a", ca_file=ca) as trusted:
        assert (await trusted.publish(b"over tls")).confirmed
    caplog.set_level(logging.WARNING, logger="msgpipe")
    async with Publisher(uri, pipeline.config, tmp_path / "b", connect_timeout=2) as untrusted:
        assert not untrusted.connected
        assert (await untrusted.publish(b"kept")).queued
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
