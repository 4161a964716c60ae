"""What the clients do without a reachable broker: no network needed (port 1 refuses)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from msgpipe import (
    Backoff,
    Consumer,
    Message,
    OutboxLimits,
    PipelineConfig,
    Properties,
    Publisher,
    PublishError,
)
from msgpipe._amqp import ConnectError, connect, redact

from .test_config import notes

PASSWORD = "s3cr3t-Pa55word"  # noqa: S105 - a made-up password the tests look for
UNREACHABLE = f"amqp://notes:{PASSWORD}@127.0.0.1:1/%2f"
CONFIG = PipelineConfig.from_dict(notes())


async def test_an_offline_publisher_queues_until_its_outbox_is_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="msgpipe")
    limits = OutboxLimits(max_messages=2)
    publisher = Publisher(
        UNREACHABLE, CONFIG, tmp_path / "outbox", outbox_limits=limits, connect_timeout=0.5
    )
    async with publisher:
        assert not publisher.connected
        assert (await publisher.publish(b"1")).queued
        assert (await publisher.publish(b"2")).queued
        with pytest.raises(PublishError) as full:
            await publisher.publish(b"3")
        assert full.value.outbox_full
        assert publisher.outbox_size == 2
        assert PASSWORD not in repr(publisher)
    assert PASSWORD not in caplog.text
    offline = [r for r in caplog.records if "offline" in r.getMessage()]
    assert len(offline) == 1
    assert offline[0].levelno == logging.WARNING


async def test_invalid_messages_are_refused_and_stay_the_callers(tmp_path: Path) -> None:
    async with Publisher(UNREACHABLE, CONFIG, tmp_path / "o", connect_timeout=0.3) as publisher:
        with pytest.raises(PublishError, match="255 bytes"):
            await publisher.publish(b"x", routing_key="k" * 256)
        with pytest.raises(PublishError, match="milliseconds"):
            await publisher.publish(b"x", properties=Properties(expiration="1.5"))
        assert publisher.outbox_size == 0


async def test_connect_errors_and_reprs_never_show_the_password() -> None:
    with pytest.raises(ConnectError) as error:
        await connect(UNREACHABLE, name="t", within=2)
    assert PASSWORD not in str(error.value)

    async def handle(message: Message) -> None:
        return None

    consumer = Consumer(UNREACHABLE, CONFIG, handle)
    assert PASSWORD not in repr(consumer)
    assert "notes:***@127.0.0.1:1" in repr(consumer)
    for uri, shown in [
        ("amqp://u:p@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
        ("amqps://u:@h/v", "amqps://u:***@h/v"),
        ("amqp://user@h/v", "amqp://user@h/v"),
    ]:
        assert redact(uri) == shown


def test_backoff_doubles_to_its_cap_with_bounded_jitter() -> None:
    policy = Backoff(0.5, 30.0)
    for step, base in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (100, 30.0)]:
        for _ in range(20):
            wait = policy.delay(step)
            assert 0.8 * base <= wait <= min(1.2 * base, 30.0)
