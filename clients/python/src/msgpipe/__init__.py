"""msgpipe: the Python client of msgpipe pipelines on RabbitMQ.

- :class:`Consumer` runs a handler per message: success acks; a failure goes to the retry tier
  of its attempt (then the dead-letter queue) with the msgpipe failure headers, and the
  original is acked only once that copy is confirmed.
- :class:`Publisher` publishes with confirms and keeps whatever the broker did not take in a
  durable SQLite outbox, resent in order.
- :class:`LiveConfig` reads the operator's ``pipeline.json`` and keeps it live.

See the README for usage and the delivery guarantees.
"""

import logging

from . import headers
from ._amqp import FailureKind, Properties, PublishFailure
from .backoff import Backoff
from .config import (
    CONFIG_PATH_ENV,
    ConfigError,
    DeadLetterTopology,
    Features,
    PipelineConfig,
    RetryTier,
    RetryTopology,
)
from .consumer import (
    Consumer,
    ConsumerStats,
    Handler,
    HandlerError,
    Message,
    PermanentError,
    RetryableError,
)
from .ids import uuid7
from .live import LiveConfig
from .outbox import Outbox, OutboxEntry, OutboxError, OutboxFullError, OutboxLimits
from .publisher import Outcome, Published, Publisher, PublishError, PublisherStats
from .retry import DeadLetter, Destination, Retry

__all__ = [
    "CONFIG_PATH_ENV",
    "Backoff",
    "ConfigError",
    "Consumer",
    "ConsumerStats",
    "DeadLetter",
    "DeadLetterTopology",
    "Destination",
    "FailureKind",
    "Features",
    "Handler",
    "HandlerError",
    "LiveConfig",
    "Message",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxFullError",
    "OutboxLimits",
    "Outcome",
    "PermanentError",
    "PipelineConfig",
    "Properties",
    "PublishError",
    "PublishFailure",
    "Published",
    "Publisher",
    "PublisherStats",
    "Retry",
    "RetryTier",
    "RetryTopology",
    "RetryableError",
    "headers",
    "uuid7",
]

__version__ = "0.1.0"

# A library leaves logging to the application: without its configuration, nothing is printed.
logging.getLogger("msgpipe").addHandler(logging.NullHandler())
