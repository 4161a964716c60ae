"""Message headers of the msgpipe retry and dead-letter protocol.

The consumer, the ``msgpipe dlq`` commands and users' own tools share these names; they are
part of the contract and never change meaning. Counts are integers (readers accept any AMQP
integer type, and digits in a string), times are RFC 3339 UTC strings, texts are strings.
"""

from typing import Final

RETRY_COUNT: Final = "x-retry-count"
"""Retries already done (0 on the first delivery). Attempt = this + 1. RabbitMQ 4 ignores an
``x-death`` header a client sets, so the count travels in msgpipe's own header."""
ERROR: Final = "x-msgpipe-error"
"""The last handler error, as text (at most 4 KiB)."""
REASON: Final = "x-msgpipe-reason"
"""Why the consumer dead-lettered the message: :data:`REASON_PERMANENT` or
:data:`REASON_EXHAUSTED`."""
REASON_PERMANENT: Final = "permanent"
REASON_EXHAUSTED: Final = "max-attempts"
ATTEMPTS: Final = "x-msgpipe-attempts"
"""Handler calls made when the message was dead-lettered."""
FIRST_FAILURE: Final = "x-msgpipe-first-failure"
LAST_FAILURE: Final = "x-msgpipe-last-failure"
ORIGINAL_EXCHANGE: Final = "x-msgpipe-original-exchange"
ORIGINAL_ROUTING_KEY: Final = "x-msgpipe-original-routing-key"
ORIGINAL_EXPIRATION: Final = "x-msgpipe-original-expiration"
"""The ``expiration`` (per-message TTL, ms as text) the message had before the consumer moved
it: a copy carries none, since it would cut a retry delay short or drop a dead letter."""
REPLAYED_AT: Final = "x-msgpipe-replayed-at"
REPLAY_COUNT: Final = "x-msgpipe-replay-count"
BROKER_FIRST_DEATH_REASON: Final = "x-first-death-reason"
"""Set by RabbitMQ on messages it dead-lettered itself (``rejected``, ``expired``,
``maxlen``, ``delivery_limit``)."""
BROKER_FIRST_DEATH_QUEUE: Final = "x-first-death-queue"
