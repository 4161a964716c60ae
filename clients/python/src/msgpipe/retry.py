"""The retry protocol as pure functions: where a failed message goes next, and the headers its
copy carries there. The consumer does the I/O; everything it decides is here."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import headers
from ._amqp import PERSISTENT, Int64, Properties
from .config import PipelineConfig

__all__ = [
    "MAX_ERROR_BYTES",
    "DeadLetter",
    "Destination",
    "FailureKind",
    "Retry",
    "copy_properties",
    "destination",
    "failure_headers",
    "header_text",
    "now_rfc3339",
    "retry_count",
    "truncate_utf8",
]

MAX_ERROR_BYTES = 4096
"""Error texts are cut to this many bytes (at a character boundary) before they go into a
header: a stack trace must not make a dead letter unpublishable."""

_MAX_COUNT = 2**32 - 1


class FailureKind(enum.Enum):
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry tier ``tier`` on the retry exchange; the message comes back after ``delay``."""

    exchange: str
    routing_key: str
    tier: int
    delay: float
    """Seconds."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The dead-letter exchange, and why (:data:`~msgpipe.headers.REASON_PERMANENT` or
    :data:`~msgpipe.headers.REASON_EXHAUSTED`)."""

    exchange: str
    reason: str


Destination = Retry | DeadLetter


def destination(config: PipelineConfig, attempt: int, kind: FailureKind) -> Destination:
    """Where a failure at ``attempt`` (1-based) goes. A retryable failure before the last
    attempt goes to the tier :meth:`PipelineConfig.tier_for_attempt` names; when the file names
    none although attempts remain (a hand-written file), the last tier is used, as capped
    attempts do."""
    if kind is FailureKind.PERMANENT:
        return DeadLetter(config.dead_letter.exchange, headers.REASON_PERMANENT)
    if attempt >= config.max_attempts:
        return DeadLetter(config.dead_letter.exchange, headers.REASON_EXHAUSTED)
    tier = config.tier_for_attempt(attempt)
    if tier is None and config.retry.tiers:
        tier = config.retry.tiers[-1]
    if tier is None:
        return DeadLetter(config.dead_letter.exchange, headers.REASON_EXHAUSTED)
    return Retry(config.retry.exchange, tier.routing_key, tier.index, tier.delay_seconds)


def copy_routing_key(dest: Destination, copy_headers: Mapping[str, Any]) -> str:
    """The tier's key for a retry; for a dead letter the message's original routing key, as
    ``x-msgpipe-original-routing-key`` of the copy says (the DLX routes every key to the DLQ)."""
    if isinstance(dest, Retry):
        return dest.routing_key
    return header_text(copy_headers, headers.ORIGINAL_ROUTING_KEY) or ""


def retry_count(message_headers: Mapping[str, Any] | None) -> int:
    """Retries already done, from ``x-retry-count``: 0 when absent or unreadable. Any integer
    type is accepted, and digits in a string."""
    value = (message_headers or {}).get(headers.RETRY_COUNT)
    count = 0
    if isinstance(value, bool):
        count = 0
    elif isinstance(value, int):
        count = value
    elif isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        try:
            count = int(text.strip())
        except ValueError:
            count = 0
    return min(max(count, 0), _MAX_COUNT)


def header_text(message_headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A header's value when it is text."""
    value = (message_headers or {}).get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None


def failure_headers(
    existing: Mapping[str, Any] | None,
    *,
    attempt: int,
    error: str,
    at: str,
    delivery_exchange: str,
    delivery_routing_key: str,
    dest: Destination,
) -> dict[str, Any]:
    """The headers of the republished copy: the delivery's own, plus the protocol headers for
    ``dest``. First-failure time and original exchange / routing key are kept when present."""
    result = dict(existing or {})
    result.setdefault(headers.FIRST_FAILURE, at)
    result.setdefault(headers.ORIGINAL_EXCHANGE, delivery_exchange)
    result.setdefault(headers.ORIGINAL_ROUTING_KEY, delivery_routing_key)
    result[headers.LAST_FAILURE] = at
    result[headers.ERROR] = truncate_utf8(error, MAX_ERROR_BYTES)
    match dest:
        case Retry():
            result[headers.RETRY_COUNT] = Int64(attempt)
        case DeadLetter(reason=reason):
            result[headers.RETRY_COUNT] = Int64(max(attempt - 1, 0))
            result[headers.REASON] = reason
            result[headers.ATTEMPTS] = Int64(attempt)
    return result


def copy_properties(original: Properties, new_headers: Mapping[str, Any]) -> Properties:
    """The copy's properties: the original's with ``new_headers``, persistent, and without
    ``expiration`` (kept in ``x-msgpipe-original-expiration``). ``message_id`` must be set."""
    final = dict(new_headers)
    if original.expiration is not None:
        final[headers.ORIGINAL_EXPIRATION] = original.expiration
    return original.with_changes(headers=final, delivery_mode=PERSISTENT, expiration=None)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, at a character boundary."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore")


def now_rfc3339() -> str:
    """Now, RFC 3339 UTC with microseconds (``2026-01-31T12:00:00.123456Z``)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime | None:
    """Reads a time header such as ``x-msgpipe-last-failure``; None when it is not one."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
