"""The consumer against a real RabbitMQ 4.3 node and a pipeline made by ``msgpipe apply``."""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import pytest

from msgpipe import Consumer, Message, PermanentError, RetryableError, headers
from msgpipe.backoff import Backoff

from .conftest import Amqp, Pipeline, eventually, mgmt, quote

pytestmark = pytest.mark.broker


def header(message: object, name: str) -> object:
    return (getattr(message, "headers", None) or {}).get(name)


async def test_success_acks(pipeline: Pipeline, amqp: Amqp) -> None:
    for i in range(3):
        await amqp.publish(f"note {i}".encode(), message_id=f"m-{i}")
    seen: list[tuple[str | None, int, bytes]] = []

    async def handle(message: Message) -> None:
        seen.append((message.message_id, message.attempt, message.body))

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await eventually(lambda: consumer.stats.acked == 3, within=10, what="3 acks")
    assert sorted(seen) == [(f"m-{i}", 1, f"note {i}".encode()) for i in range(3)]
    assert await amqp.depth("notes_queue") == 0


async def test_a_retryable_failure_goes_through_its_tier_with_the_failure_headers(
    pipeline: Pipeline, amqp: Amqp
) -> None:
    await amqp.publish(b"retry me", message_id="r-1", correlation_id="c-1", headers={"tenant": "t"})
    seen: list[Message] = []
    times: list[float] = []

    async def handle(message: Message) -> None:
        seen.append(message)
        times.append(time.monotonic())
        if message.attempt == 1:
            raise RetryableError("db timeout")

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await eventually(lambda: consumer.stats.acked == 1, within=10, what="the retry handled")
        assert consumer.stats.retried == 1
    first, second = seen
    assert (first.attempt, second.attempt) == (1, 2)
    assert (first.routing_key, second.routing_key) == ("notes", "notes_queue")
    assert second.exchange == "", "back from the tier through the default exchange"
    assert times[1] - times[0] >= 0.1, "waited at least the tier's 100 ms"
    assert second.message_id == "r-1"
    assert second.properties.correlation_id == "c-1"
    assert second.properties.delivery_mode == 2
    assert second.headers[headers.RETRY_COUNT] == 1
    assert second.headers[headers.ERROR] == "db timeout"
    assert second.headers["tenant"] == "t"
    assert second.headers[headers.ORIGINAL_EXCHANGE] == "notes"
    assert second.headers[headers.ORIGINAL_ROUTING_KEY] == "notes"
    assert second.header_time(headers.FIRST_FAILURE) is not None
    assert second.headers[headers.FIRST_FAILURE] == second.headers[headers.LAST_FAILURE]
    assert headers.REASON not in second.headers
    assert await amqp.depth("notes_dlq") == 0


async def test_the_last_failure_dead_letters_with_the_reason_headers(
    pipeline: Pipeline, amqp: Amqp
) -> None:
    await amqp.publish(b"always fails", message_id="d-1", expiration=60)
    attempts: list[int] = []

    async def handle(message: Message) -> None:
        attempts.append(message.attempt)
        raise RetryableError(f"failure {message.attempt}")

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await eventually(lambda: consumer.stats.dead_lettered == 1, within=10, what="dead letter")
        assert consumer.stats.retried == 2
    assert attempts == [1, 2, 3]
    (letter,) = await amqp.drain("notes_dlq")
    assert letter.message_id == "d-1"
    assert letter.body == b"always fails"
    assert header(letter, headers.REASON) == headers.REASON_EXHAUSTED
    assert header(letter, headers.ATTEMPTS) == 3
    assert header(letter, headers.RETRY_COUNT) == 2
    assert header(letter, headers.ERROR) == "failure 3"
    assert header(letter, headers.ORIGINAL_ROUTING_KEY) == "notes"
    assert header(letter, headers.ORIGINAL_EXPIRATION) == "60000"
    assert letter.expiration is None, "a dead letter must not expire"
    first = str(header(letter, headers.FIRST_FAILURE))
    last = str(header(letter, headers.LAST_FAILURE))
    assert first < last, "the first failure's time is kept"
    assert await amqp.depth("notes_queue") == 0


async def test_a_permanent_failure_goes_straight_to_the_dlq(pipeline: Pipeline, amqp: Amqp) -> None:
    await amqp.publish(b"not json", message_id="p-1", content_type="application/json")
    calls = 0

    async def handle(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("cannot parse")

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await eventually(lambda: consumer.stats.dead_lettered == 1, within=10, what="dead letter")
    assert calls == 1
    (letter,) = await amqp.drain("notes_dlq")
    assert header(letter, headers.REASON) == headers.REASON_PERMANENT
    assert (header(letter, headers.ATTEMPTS), header(letter, headers.RETRY_COUNT)) == (1, 0)
    assert header(letter, headers.ERROR) == "cannot parse"
    assert letter.content_type == "application/json"


async def test_an_unexpected_exception_is_a_retryable_failure(
    pipeline: Pipeline, amqp: Amqp
) -> None:
    await amqp.publish(b"x", message_id="t-1")
    seen: list[Message] = []

    async def handle(message: Message) -> None:
        seen.append(message)
        if message.attempt == 1:
            raise ZeroDivisionError("boom")

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await eventually(lambda: consumer.stats.acked == 1, within=10, what="handled on retry")
        assert consumer.stats.retried == 1
    assert seen[1].attempt == 2
    assert seen[1].headers[headers.ERROR] == "ZeroDivisionError: boom"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_a_message_that_cannot_be_moved_is_given_back_by_reject_until_the_delivery_limit(
    pipeline: Pipeline, amqp: Amqp
) -> None:
    """The retry exchange is gone: every copy fails (404), every give-back is a
    basic.reject(requeue) after a pause, and RabbitMQ 4.3's delivery-limit (= max attempts)
    dead-letters the message. With basic.nack instead, 4.3 never counts the give-backs and the
    message loops forever (this test then times out)."""
    await amqp.channel.exchange_delete("notes_queue.retry")
    await amqp.publish(b"stuck", message_id="stuck-1")
    calls = 0

    async def handle(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise RetryableError("flaky dependency")

    cpu_before, started = cpu_seconds(), time.monotonic()
    async with Consumer(
        pipeline.uri, pipeline.config, handle, give_back=Backoff(0.2, 1.0)
    ) as consumer:
        await eventually(lambda: amqp.depth("notes_dlq"), within=40, what="dead-lettered")
        stats = consumer.stats
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu_before
    (letter,) = await amqp.drain("notes_dlq")
    assert letter.message_id == "stuck-1"
    assert header(letter, headers.BROKER_FIRST_DEATH_REASON) == "delivery_limit"
    assert (stats.retried, stats.dead_lettered, stats.acked) == (0, 0, 0), stats
    assert stats.requeued >= 3
    assert calls <= pipeline.config.max_attempts + 1
    assert wall >= 0.2 + 0.4, "give-backs pause (doubling) instead of looping hot"
    assert cpu < 0.5 * wall, f"CPU {cpu:.2f} s over {wall:.2f} s"
    assert await amqp.depth("notes_queue") == 0


async def test_stop_finishes_the_handlers_in_flight(pipeline: Pipeline, amqp: Amqp) -> None:
    await amqp.publish(b"slow", message_id="s-1")
    started, finished = asyncio.Event(), asyncio.Event()

    async def handle(message: Message) -> None:
        started.set()
        await asyncio.sleep(1.0)
        finished.set()

    consumer = Consumer(pipeline.uri, pipeline.config, handle)
    running = asyncio.create_task(consumer.run())
    await asyncio.wait_for(started.wait(), 10)
    consumer.stop()
    stats = await asyncio.wait_for(running, 10)
    assert finished.is_set(), "run() returned only after the handler finished"
    assert stats.acked == 1
    assert await amqp.depth("notes_queue") == 0, "acked, not given back"


def close_connections(vhost: str, name: str) -> int:
    closed = 0
    for connection in mgmt("GET", f"/vhosts/{quote(vhost)}/connections") or []:
        if connection.get("client_properties", {}).get("connection_name") == name:
            mgmt("DELETE", f"/connections/{quote(connection['name'])}", ok=(404,))
            closed += 1
    return closed


async def test_the_consumer_comes_back_after_a_lost_connection_and_a_cancelled_consumer(
    pipeline: Pipeline, amqp: Amqp, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[str | None] = []

    async def handle(message: Message) -> None:
        handled.append(message.message_id)

    async with Consumer(pipeline.uri, pipeline.config, handle) as consumer:
        await asyncio.wait_for(consumer.wait_consuming(), 10)
        # The broker closes the connection (as on a node restart or a network cut).
        await eventually(
            lambda: asyncio.to_thread(close_connections, pipeline.vhost, "msgpipe-consumer"),
            within=10,
            what="the consumer's connection listed",
        )
        await eventually(lambda: consumer.stats.connections == 2, within=10, what="reconnected")
        await amqp.publish(b"after reconnect", message_id="a-1")
        await eventually(lambda: handled == ["a-1"], within=10, what="handled after reconnect")

        # The queue is deleted: the broker cancels the consumer, which retries (with backoff)
        # until the pipeline is applied again.
        caplog.set_level(logging.WARNING, logger="msgpipe.consumer")
        caplog.clear()
        await amqp.channel.queue_delete("notes_queue")
        await eventually(lambda: not consumer.consuming, within=10, what="cancel noticed")
        await asyncio.sleep(3)  # the queue is missing: every session dies at once
        retries = [r for r in caplog.records if "consumer session ended" in r.getMessage()]
        # 0.2 + 0.4 + 0.8 + 1.6 s: the backoff keeps growing, no reconnect loop.
        assert 2 <= len(retries) <= 6, [r.getMessage() for r in retries]
        await pipeline.apply_async()
        await amqp.publish(b"after cancel", message_id="a-2")
        await eventually(lambda: handled == ["a-1", "a-2"], within=20, what="handled after cancel")
        assert consumer.stats.connections == 3
