"""The AMQP side shared by the consumer and the publisher: message properties, connecting, and
one confirmed, ``mandatory`` publish on a channel that is reopened when the broker closed it.

aio-pika owns connections and channels (opening, closing, close notifications, QoS). Publishes,
deliveries and acks go through each channel's aiormq layer (``get_underlay_channel()``,
aio-pika's public accessor) with pamqp's own property objects: a copy must keep every
property of the delivery exactly (protocol H-3), and aio-pika's ``Message`` round trip would
add ``priority: 0`` and pass ``expiration`` through float seconds.

Neither the consumer nor the publisher uses aio-pika's robust (auto-recovering) connection:
each runs its own loop (connect, open channels, work until the connection is gone, wait with
capped backoff, again), so that "the connection is gone" is one visible event and a broken
topology can never turn into a reconnect storm.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp import commands as spec
from pamqp import encode as pamqp_encode
from yarl import URL

__all__ = [
    "ConfirmChannel",
    "FailureKind",
    "Int64",
    "Properties",
    "PublishFailure",
    "connect",
    "redact",
]

log = logging.getLogger("msgpipe")

PERSISTENT = 2


class Int64(int):
    """An integer header value that goes on the wire as AMQP ``l`` (signed 64-bit), the type
    protocol rule H-1 gives ``x-retry-count`` and ``x-msgpipe-attempts``. (pamqp picks the
    smallest integer type for a plain ``int``.)"""


def _teach_pamqp_table_values() -> None:
    """Wraps pamqp's table encoder for two values it cannot write as msgpipe needs:
    :class:`Int64` (as ``l``), and ``bytes``, which is what pamqp itself decodes a long-string
    header that is not UTF-8 into, and then refuses to encode (so a copy of such a message
    could never be published). Every other value encodes as before."""
    original = pamqp_encode.encode_table_value

    def encode_table_value(value: Any) -> bytes:
        if type(value) is Int64:
            return b"l" + pamqp_encode.long_long_int(int(value))
        if type(value) is bytes:
            return b"S" + len(value).to_bytes(4, "big") + value
        return original(value)

    pamqp_encode.encode_table_value = encode_table_value


_teach_pamqp_table_values()


@dataclass(frozen=True, slots=True)
class Properties:
    """AMQP basic properties of a message, as msgpipe stores and republishes them.

    ``expiration`` is the per-message TTL in milliseconds as text, exactly as on the wire.
    """

    message_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None

    def with_changes(self, **changes: Any) -> Properties:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_amqp(self) -> spec.Basic.Properties:
        return spec.Basic.Properties(
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            headers=dict(self.headers) if self.headers else None,
            delivery_mode=self.delivery_mode,
            priority=self.priority,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            expiration=self.expiration,
            message_id=self.message_id,
            timestamp=self.timestamp,
            message_type=self.type,
            user_id=self.user_id,
            app_id=self.app_id,
            cluster_id=self.cluster_id or "",
        )

    @classmethod
    def from_amqp(cls, properties: spec.Basic.Properties) -> Properties:
        """The properties of a delivered message, as they came."""
        return cls(
            message_id=properties.message_id,
            headers=MappingProxyType(dict(properties.headers or {})),  # read-only for handlers
            content_type=properties.content_type,
            content_encoding=properties.content_encoding,
            delivery_mode=properties.delivery_mode,
            priority=properties.priority,
            correlation_id=properties.correlation_id,
            reply_to=properties.reply_to,
            expiration=properties.expiration,
            timestamp=properties.timestamp,
            type=properties.message_type,
            user_id=properties.user_id,
            app_id=properties.app_id,
            cluster_id=properties.cluster_id or None,
        )


class ConnectError(Exception):
    """The broker could not be reached (the text never holds the URI's password)."""


def redact(text: str, uri: str | None = None) -> str:
    """``text`` without the password of any ``scheme://user:password@`` in it, nor ``uri``'s."""
    if uri:
        try:
            password = URL(uri).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "***")
    return re.sub(r"(\w+://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


async def connect(
    uri: str, *, name: str, within: float, ca_file: str | None = None
) -> AbstractConnection:
    """One connection (no auto-recovery), within ``within`` seconds."""
    ssl_context = None
    if uri.startswith("amqps:"):
        ssl_context = ssl.create_default_context(cafile=ca_file)
    try:
        async with asyncio.timeout(within):
            return await aio_pika.connect(
                uri,
                timeout=within,
                client_properties={"connection_name": name},
                ssl_context=ssl_context,
            )
    except TimeoutError:
        raise ConnectError(f"cannot connect: no answer within {within:g} s") from None
    except Exception as error:  # noqa: BLE001 - whatever it was, the caller retries
        raise ConnectError(f"cannot connect: {redact(describe(error), uri)}") from None


def describe(error: BaseException) -> str:
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


class FailureKind(enum.Enum):
    """Why a publish is not known to be safe on the broker."""

    NO_EXCHANGE = "no-exchange"
    """The exchange does not exist: the broker closed the channel (404 NOT_FOUND)."""
    UNROUTABLE = "unroutable"
    """The broker returned the message (``mandatory``): no queue is bound for its key."""
    NACKED = "nacked"
    """The broker nacked it (a queue refused it, e.g. ``overflow: reject-publish``)."""
    TIMEOUT = "timeout"
    """No confirm in time."""
    CHANNEL = "channel"
    """The channel or the connection failed."""

    @property
    def route_missing(self) -> bool:
        """The pipeline's topology is not (yet) on the broker."""
        return self in (FailureKind.NO_EXCHANGE, FailureKind.UNROUTABLE)


class PublishFailure(Exception):
    """A publish the broker did not confirm, or confirmed without routing."""

    def __init__(self, kind: FailureKind, exchange: str, routing_key: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.exchange = exchange
        self.routing_key = routing_key
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


def classify(error: BaseException, exchange: str, routing_key: str) -> PublishFailure:
    def failure(kind: FailureKind, detail: str) -> PublishFailure:
        return PublishFailure(kind, exchange, routing_key, detail)

    match error:
        case aiormq.exceptions.PublishError():
            return failure(
                FailureKind.UNROUTABLE,
                f"returned: no queue bound to exchange {exchange!r} for key {routing_key!r}",
            )
        case aiormq.exceptions.DeliveryError(frame=spec.Basic.Nack()):
            return failure(FailureKind.NACKED, "the broker nacked the message")
        case aiormq.exceptions.ChannelNotFoundEntity():
            return failure(FailureKind.NO_EXCHANGE, str(error))
        case TimeoutError():
            return failure(FailureKind.TIMEOUT, "no confirm in time")
        case _:
            return failure(FailureKind.CHANNEL, describe(error))


class ConfirmChannel:
    """A publisher-confirm channel on ``connection``, reopened on the same connection when the
    broker closed it (a publish to a missing exchange closes the channel, not the connection)."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self.reopened = 0

    async def channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                if self._channel is not None:
                    self.reopened += 1
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        within: float,
    ) -> None:
        """Publishes with ``mandatory`` and waits for the confirm; raises :class:`PublishFailure`
        unless the broker acked the message and did not return it."""
        amqp_properties = properties.to_amqp()
        try:
            async with asyncio.timeout(within):
                for last_try in (False, True):
                    channel = await self.channel()
                    underlay = await channel.get_underlay_channel()
                    try:
                        await underlay.basic_publish(
                            body,
                            exchange=exchange,
                            routing_key=routing_key,
                            properties=amqp_properties,
                            mandatory=True,
                        )
                    except aiormq.exceptions.ChannelInvalidStateError:
                        # The channel was closed before this publish went out (another
                        # publish on it hit a missing exchange, say): the broker never saw
                        # it, so one more try on a fresh channel cannot make a duplicate.
                        if last_try:
                            raise
                    else:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise classify(error, exchange, routing_key) from error

    def drop(self) -> None:
        """Closes the channel in the background (after a timeout it may be stuck); the next
        publish opens a new one."""
        channel, self._channel = self._channel, None
        if channel is not None:
            task = asyncio.ensure_future(_close_quietly(channel))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await _close_quietly(channel)


_background: set[asyncio.Future[None]] = set()


async def _close_quietly(channel: AbstractChannel) -> None:
    if channel.is_closed:
        return
    try:
        async with asyncio.timeout(2):
            await channel.close()
    except Exception as error:  # noqa: BLE001 - closing is best effort
        log.debug("closing a channel: %s", describe(error))
