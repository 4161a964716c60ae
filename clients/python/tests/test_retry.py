"""The retry protocol as pure functions: destinations (C-4..C-6), headers (H-1..H-4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pamqp.decode
import pamqp.encode
import pytest

from msgpipe import PipelineConfig, Properties, headers, uuid7
from msgpipe.retry import (
    MAX_ERROR_BYTES,
    DeadLetter,
    FailureKind,
    Retry,
    copy_properties,
    copy_routing_key,
    destination,
    failure_headers,
    now_rfc3339,
    parse_rfc3339,
    retry_count,
    truncate_utf8,
)
from tests.test_config import notes


def config(
    max_attempts: int = 5, delays: tuple[int, ...] = (1000, 2000, 4000, 8000)
) -> PipelineConfig:
    tiers = [
        {
            "index": i,
            "routing_key": str(i),
            "queue": f"q.retry.{i}",
            "delay_ms": delay,
            "first_attempt": i,
            "last_attempt": max_attempts - 1 if i == len(delays) else i,
        }
        for i, delay in enumerate(delays, start=1)
    ]
    data = notes(max_attempts=max_attempts)
    data["retry"] = {"exchange": "notes_queue.retry", "tiers": tiers}
    return PipelineConfig.from_json(json.dumps(data))


def test_a_failure_at_attempt_k_goes_to_tier_k_until_the_last_attempt() -> None:
    pipeline = config()
    assert destination(pipeline, 1, FailureKind.RETRYABLE) == Retry(
        "notes_queue.retry", "1", 1, 1.0
    )
    assert destination(pipeline, 4, FailureKind.RETRYABLE) == Retry(
        "notes_queue.retry", "4", 4, 8.0
    )
    for attempt in (5, 6, 2**32):
        assert destination(pipeline, attempt, FailureKind.RETRYABLE) == DeadLetter(
            "notes_dlq_exchange", headers.REASON_EXHAUSTED
        )


def test_capped_attempts_share_the_last_tier_and_permanent_failures_skip_retries() -> None:
    capped = config(max_attempts=8, delays=(1000, 2000, 4000, 5000))
    assert destination(capped, 7, FailureKind.RETRYABLE).tier == 4  # type: ignore[union-attr]
    assert destination(capped, 1, FailureKind.PERMANENT) == DeadLetter(
        "notes_dlq_exchange", headers.REASON_PERMANENT
    )
    no_retry = config(max_attempts=1, delays=())
    assert isinstance(destination(no_retry, 1, FailureKind.RETRYABLE), DeadLetter)


@pytest.mark.parametrize(
    ("value", "count"),
    [(None, 0), (3, 3), (" 3 ", 3), (b"3", 3), (-4, 0), ("x", 0), (True, 0), (2**70, 2**32 - 1)],
)
def test_retry_count_reads_any_integer_and_digits_and_defaults_to_zero(
    value: Any, count: int
) -> None:
    table = {} if value is None else {headers.RETRY_COUNT: value}
    assert retry_count(table) == count


def test_first_failure_sets_the_original_route_and_later_ones_keep_it() -> None:
    pipeline = config()
    first_at, later_at = "2026-01-01T00:00:00Z", "2026-01-01T00:00:03Z"
    after_one = failure_headers(
        {"tenant": "acme"},
        attempt=1,
        error="db timeout",
        at=first_at,
        delivery_exchange="notes",
        delivery_routing_key="notes",
        dest=destination(pipeline, 1, FailureKind.RETRYABLE),
    )
    assert after_one[headers.RETRY_COUNT] == 1
    assert after_one[headers.ERROR] == "db timeout"
    assert after_one[headers.FIRST_FAILURE] == after_one[headers.LAST_FAILURE] == first_at
    assert after_one[headers.ORIGINAL_EXCHANGE] == "notes"
    assert after_one["tenant"] == "acme"
    assert headers.REASON not in after_one
    # The retried copy comes back through the default exchange with the queue as key.
    after_two = failure_headers(
        after_one,
        attempt=2,
        error="still down",
        at=later_at,
        delivery_exchange="",
        delivery_routing_key="notes_queue",
        dest=destination(pipeline, 2, FailureKind.RETRYABLE),
    )
    assert after_two[headers.RETRY_COUNT] == 2
    assert after_two[headers.FIRST_FAILURE] == first_at
    assert after_two[headers.LAST_FAILURE] == later_at
    assert (after_two[headers.ORIGINAL_EXCHANGE], after_two[headers.ORIGINAL_ROUTING_KEY]) == (
        "notes",
        "notes",
    )


def test_dead_letter_headers_say_why_and_route_by_the_original_key() -> None:
    pipeline = config()
    dest = destination(pipeline, 5, FailureKind.RETRYABLE)
    letter = failure_headers(
        {headers.RETRY_COUNT: 4, headers.ORIGINAL_ROUTING_KEY: "notes"},
        attempt=5,
        error="db timeout",
        at=now_rfc3339(),
        delivery_exchange="",
        delivery_routing_key="notes_queue",
        dest=dest,
    )
    assert letter[headers.REASON] == headers.REASON_EXHAUSTED
    assert (letter[headers.ATTEMPTS], letter[headers.RETRY_COUNT]) == (5, 4)
    assert copy_routing_key(dest, letter) == "notes"
    permanent = failure_headers(
        None,
        attempt=1,
        error="bad json",
        at=now_rfc3339(),
        delivery_exchange="notes",
        delivery_routing_key="notes",
        dest=destination(pipeline, 1, FailureKind.PERMANENT),
    )
    assert (
        permanent[headers.REASON],
        permanent[headers.ATTEMPTS],
        permanent[headers.RETRY_COUNT],
    ) == (
        headers.REASON_PERMANENT,
        1,
        0,
    )


def test_counts_go_on_the_wire_as_amqp_long_long() -> None:
    letter = failure_headers(
        None,
        attempt=2,
        error="e",
        at=now_rfc3339(),
        delivery_exchange="notes",
        delivery_routing_key="notes",
        dest=DeadLetter("dlx", headers.REASON_EXHAUSTED),
    )
    encoded = pamqp.encode.field_table({headers.ATTEMPTS: letter[headers.ATTEMPTS]})
    assert encoded.endswith(b"l" + (2).to_bytes(8, "big"))
    # Plain integers of users' own headers keep pamqp's own encoding.
    assert pamqp.encode.field_table({"n": 2}).endswith(b"b\x02")


def test_a_header_pamqp_decodes_to_bytes_can_be_written_back() -> None:
    raw = b"\xff\xfe not utf-8"
    wire = b"S" + len(raw).to_bytes(4, "big") + raw
    table = len(b"\x01k" + wire).to_bytes(4, "big") + b"\x01k" + wire
    _, decoded = pamqp.decode.field_table(table)
    assert decoded == {"k": raw}
    assert pamqp.encode.field_table(decoded) == table


def test_long_errors_are_cut_at_a_character_boundary() -> None:
    text = "é" * MAX_ERROR_BYTES  # 2 bytes each
    assert len(truncate_utf8(text, MAX_ERROR_BYTES).encode()) == MAX_ERROR_BYTES
    assert truncate_utf8(text, 5) == "éé"
    assert truncate_utf8("short", 100) == "short"


def test_copies_are_persistent_lose_their_expiration_and_keep_everything_else() -> None:
    original = Properties(
        message_id="m-1",
        content_type="text/plain",
        correlation_id="c-1",
        expiration="60000",
        delivery_mode=1,
        priority=3,
        app_id="notes",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        headers={"tenant": "acme"},
    )
    copy = copy_properties(original, {"tenant": "acme", headers.ERROR: "x"})
    assert copy.expiration is None
    assert copy.delivery_mode == 2
    assert copy.headers[headers.ORIGINAL_EXPIRATION] == "60000"
    assert (
        copy.message_id,
        copy.content_type,
        copy.correlation_id,
        copy.priority,
        copy.app_id,
    ) == (
        "m-1",
        "text/plain",
        "c-1",
        3,
        "notes",
    )
    assert copy.timestamp == original.timestamp


def test_times_are_rfc3339_utc_and_ids_are_time_ordered_uuid7() -> None:
    now = now_rfc3339()
    assert now.endswith("Z")
    assert parse_rfc3339(now) is not None
    assert parse_rfc3339("yesterday") is None
    ids = [uuid7() for _ in range(5000)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids), "ids made later sort later"
    assert len(set(ids)) == len(ids)
