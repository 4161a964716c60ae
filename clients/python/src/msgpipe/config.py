"""The ``pipeline.json`` contract between the msgpipe operator and its clients.

The operator writes this file into the ConfigMap ``<pipeline>-client``; applications mount it
and point the client at it (a path, or the environment variable ``MSGPIPE_PIPELINE_CONFIG``).
Unknown fields are ignored, so a client keeps working when a newer operator adds some.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE_NAME",
    "CONFIG_PATH_ENV",
    "CONFIG_VERSION",
    "ConfigError",
    "DeadLetterTopology",
    "Features",
    "PipelineConfig",
    "RetryTier",
    "RetryTopology",
    "config_path_from_env",
]

CONFIG_FILE_NAME = "pipeline.json"
"""Key of the file in the ``<pipeline>-client`` ConfigMap."""
CONFIG_PATH_ENV = "MSGPIPE_PIPELINE_CONFIG"
"""Environment variable holding the path of ``pipeline.json``."""
CONFIG_VERSION = 1
"""Version of the contract this client understands."""


class ConfigError(Exception):
    """``pipeline.json`` is missing, unreadable, not valid, or of another contract version."""


@dataclass(frozen=True, slots=True)
class RetryTier:
    """One retry queue and the failed attempts that wait in it."""

    index: int
    """1-based tier number."""
    routing_key: str
    """Routing key binding the tier queue to the retry exchange."""
    queue: str
    """The tier's queue."""
    delay_ms: int
    """How long a message waits in this tier (the queue's message TTL), in milliseconds."""
    first_attempt: int
    """A failure at attempt k uses this tier when ``first_attempt <= k <= last_attempt``."""
    last_attempt: int

    @property
    def delay_seconds(self) -> float:
        return self.delay_ms / 1000


@dataclass(frozen=True, slots=True)
class RetryTopology:
    """The retry exchange and its tiers, in tier order."""

    exchange: str
    tiers: tuple[RetryTier, ...]


@dataclass(frozen=True, slots=True)
class DeadLetterTopology:
    """Where messages go once they will not be retried."""

    exchange: str
    queue: str


@dataclass(frozen=True, slots=True)
class Features:
    """Client feature flags (the ``features`` block), picked up without a restart."""

    retry_pending: bool
    """Resend the messages kept in the local outbox. Off parks the outbox."""
    retry_interval_seconds: int
    """Seconds between resend rounds while messages remain in the outbox."""


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Everything a client needs to publish to, consume from and retry on one pipeline."""

    version: int
    pipeline: str
    """``<namespace>/<name>`` of the MessagePipeline."""
    vhost: str
    exchange: str
    """Work exchange publishers send to."""
    routing_key: str
    """Routing key publishers use on :attr:`exchange`."""
    queue: str
    """Work queue consumers read from."""
    max_attempts: int
    """Handler calls before a message is dead-lettered (1 means no retry)."""
    retry: RetryTopology
    dead_letter: DeadLetterTopology
    features: Features

    @classmethod
    def from_dict(cls, data: Any, origin: str = "pipeline.json") -> PipelineConfig:
        """Checks and converts parsed JSON; ``origin`` names the source in errors."""
        version = data.get("version") if isinstance(data, dict) else None
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"{origin} has contract version {version!r}; "
                f"this client understands version {CONFIG_VERSION}"
            )
        try:
            retry = data["retry"]
            dead_letter = data["dead_letter"]
            features = data["features"]
            return cls(
                version=CONFIG_VERSION,
                pipeline=_str(data["pipeline"]),
                vhost=_str(data["vhost"]),
                exchange=_str(data["exchange"]),
                routing_key=_str(data["routing_key"]),
                queue=_str(data["queue"]),
                max_attempts=_int(data["max_attempts"]),
                retry=RetryTopology(
                    exchange=_str(retry["exchange"]),
                    tiers=tuple(
                        RetryTier(
                            index=_int(tier["index"]),
                            routing_key=_str(tier["routing_key"]),
                            queue=_str(tier["queue"]),
                            delay_ms=_int(tier["delay_ms"]),
                            first_attempt=_int(tier["first_attempt"]),
                            last_attempt=_int(tier["last_attempt"]),
                        )
                        for tier in retry["tiers"]
                    ),
                ),
                dead_letter=DeadLetterTopology(
                    exchange=_str(dead_letter["exchange"]),
                    queue=_str(dead_letter["queue"]),
                ),
                features=Features(
                    retry_pending=_bool(features["retry_pending"]),
                    retry_interval_seconds=_int(features["retry_interval_seconds"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{origin} is not a valid pipeline.json: {error!r}") from error

    @classmethod
    def from_json(cls, text: str, origin: str = "pipeline.json") -> PipelineConfig:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"{origin} is not valid JSON: {error}") from error
        return cls.from_dict(data, origin)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> PipelineConfig:
        """Reads and checks a ``pipeline.json`` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read {os.fspath(path)}: {error.strerror}") from error
        return cls.from_json(text, os.fspath(path))

    @classmethod
    def from_env(cls) -> PipelineConfig:
        """Reads the file named by ``MSGPIPE_PIPELINE_CONFIG``."""
        return cls.from_path(config_path_from_env())

    def tier_for_attempt(self, attempt: int) -> RetryTier | None:
        """The retry tier for a failure at ``attempt`` (1-based), or None when the message has
        used all its attempts and goes to the dead-letter exchange."""
        if attempt >= self.max_attempts:
            return None
        for tier in self.retry.tiers:
            if tier.first_attempt <= attempt <= tier.last_attempt:
                return tier
        return None


def config_path_from_env() -> Path:
    """The path in ``MSGPIPE_PIPELINE_CONFIG``; :class:`ConfigError` when it is not set."""
    value = os.environ.get(CONFIG_PATH_ENV)
    if not value:
        raise ConfigError(f"{CONFIG_PATH_ENV} is not set")
    return Path(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value
