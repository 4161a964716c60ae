"""The consumer: runs a handler per message and settles every delivery by the retry protocol.

Success acks. A failure republishes a copy (to the retry tier of this attempt, or to the
dead-letter exchange) on a publisher-confirm channel with ``mandatory``, and acks the original
only once the broker confirmed the copy and did not return it. If the copy is nacked,
returned, not confirmed in time or its channel dies, the original is *given back*: after a
pause that doubles while give-backs continue (0.5 s to 30 s by default) it is rejected with
``requeue=True``. Nothing is acked before it is safely elsewhere.

Why ``basic.reject`` and never ``basic.nack``: on a quorum queue the broker's ``delivery-limit``
must count every give-back, or a message the client can never move (its retry tier missing
from the broker) loops forever. RabbitMQ 4.3 does not count ``basic.nack(requeue=True)``
toward ``delivery-limit``; ``basic.reject(requeue=True)`` and a closed channel count on every
supported version. The pause keeps a broken topology from becoming a hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import AbstractChannel as AmqpChannel
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from . import retry
from ._amqp import (
    ConfirmChannel,
    ConnectError,
    FailureKind,
    Properties,
    PublishFailure,
    connect,
    describe,
    redact,
)
from .backoff import Backoff, BackoffSteps
from .config import PipelineConfig
from .ids import uuid7
from .live import LiveConfig

__all__ = [
    "Consumer",
    "ConsumerStats",
    "Handler",
    "HandlerError",
    "Message",
    "PermanentError",
    "RetryableError",
]

log = logging.getLogger("msgpipe.consumer")

RECONNECT = Backoff(0.2, 30.0)
"""Default waits between reconnect attempts."""
GIVE_BACK = Backoff(0.5, 30.0)
"""Default pauses before a message whose copy the broker did not take is given back."""
_SETTLE_TIMEOUT = 5.0
"""Longest wait for an ack or a reject to be handed to the connection."""


class HandlerError(Exception):
    """Base of the failures a handler reports on purpose."""


class RetryableError(HandlerError):
    """Try again later: the message goes to the retry tier of this attempt, or to the
    dead-letter queue after the last attempt. Any other exception a handler raises counts as
    retryable too."""


class PermanentError(HandlerError):
    """Retrying cannot help (a malformed message): the message goes to the dead-letter queue
    now."""


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message, as the handler sees it."""

    body: bytes
    properties: Properties
    exchange: str
    """Exchange of this copy (empty for a message back from a retry tier)."""
    routing_key: str
    """Routing key of this copy (the queue name for a message back from a retry tier)."""
    redelivered: bool
    """An earlier delivery of this copy may have been handled already (a consumer died before
    its ack): deduplicate by :attr:`message_id`."""
    attempt: int
    """1-based: ``x-retry-count + 1``. A redelivery after a crash or a give-back keeps the
    attempt number: only handler failures count."""
    config: PipelineConfig = field(repr=False)
    """The pipeline as it was when the message was delivered; its failure goes by this."""

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.properties.headers

    @property
    def max_attempts(self) -> int:
        return self.config.max_attempts

    @property
    def is_last_attempt(self) -> bool:
        """A failure now sends the message to the dead-letter queue rather than a retry tier."""
        return self.attempt >= self.config.max_attempts

    def header_text(self, name: str) -> str | None:
        return retry.header_text(self.properties.headers, name)

    def header_time(self, name: str) -> datetime | None:
        """A time header such as :data:`msgpipe.headers.LAST_FAILURE`; None if absent or not
        RFC 3339."""
        text = self.header_text(name)
        return None if text is None else retry.parse_rfc3339(text)

    def failure_destination(self, error: BaseException) -> retry.Destination:
        """Where the consumer sends this message if the handler raises ``error``."""
        kind = (
            retry.FailureKind.PERMANENT
            if isinstance(error, PermanentError)
            else retry.FailureKind.RETRYABLE
        )
        return retry.destination(self.config, self.attempt, kind)


Handler = Callable[[Message], Awaitable[None]]


@dataclass(slots=True)
class ConsumerStats:
    """What the consumer did since it started."""

    delivered: int = 0
    """Messages handed to the handler."""
    acked: int = 0
    """Handled successfully and acked."""
    retried: int = 0
    """Failed, copy confirmed on a retry tier, original acked."""
    dead_lettered: int = 0
    """Failed for good, copy confirmed on the dead-letter exchange, original acked."""
    requeued: int = 0
    """Failed, copy not confirmed: the original was given back (rejected with requeue)."""
    connections: int = 0
    """Sessions that started consuming (1 + reconnects)."""

    @property
    def settled(self) -> int:
        return self.acked + self.retried + self.dead_lettered


class _SessionLostError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Receipt:
    """Settles one delivery on the channel it came on."""

    channel: AmqpChannel
    delivery_tag: int

    async def ack(self) -> None:
        await self.channel.basic_ack(self.delivery_tag)

    async def give_back(self) -> None:
        """``basic.reject(requeue=True)``: counted toward ``delivery-limit`` on every supported
        RabbitMQ version. Never ``basic.nack``: RabbitMQ 4.3 does not count it."""
        await self.channel.basic_reject(self.delivery_tag, requeue=True)


@dataclass(slots=True)
class _Session:
    connection: AbstractConnection
    channel: AbstractChannel
    deliveries: AmqpChannel
    """The consuming channel's aiormq layer: deliveries, acks and rejects."""
    copies: ConfirmChannel


class Consumer:
    """Reads a pipeline's work queue and runs ``handler`` for each message.

    ``await consumer.run()`` consumes until :meth:`stop`, reconnecting with capped backoff
    whenever the connection is lost or the broker cancels the consumer, and returns once the
    handlers in flight have finished. ``async with Consumer(...)`` runs it in a task and stops
    it on exit.

    The handler may run more than once for one message (at least once: a crash between
    handling and ack redelivers it): make it idempotent or deduplicate by message id.
    """

    def __init__(
        self,
        uri: str,
        config: LiveConfig | PipelineConfig,
        handler: Handler,
        *,
        prefetch: int = 64,
        concurrency: int = 16,
        confirm_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect: Backoff = RECONNECT,
        give_back: Backoff = GIVE_BACK,
        connection_name: str = "msgpipe-consumer",
        ca_file: str | None = None,
    ) -> None:
        if prefetch < 1 or concurrency < 1:
            raise ValueError("prefetch and concurrency must be at least 1")
        self._uri = uri
        self._config = config if isinstance(config, LiveConfig) else LiveConfig.fixed(config)
        self._handler = handler
        self._prefetch = prefetch
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect
        self._give_back = give_back
        self._connection_name = connection_name
        self._ca_file = ca_file
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._consuming = asyncio.Event()
        self._give_backs_in_a_row = 0
        self._runner: asyncio.Task[ConsumerStats] | None = None
        self.stats = ConsumerStats()

    def __repr__(self) -> str:
        return f"Consumer({redact(self._uri, self._uri)!r}, queue={self._config.current.queue!r})"

    def stop(self) -> None:
        """Stops consuming; :meth:`run` returns once the handlers in flight are done."""
        self._stopping.set()

    async def wait_consuming(self) -> None:
        """Waits until the consumer is registered on the broker."""
        await self._consuming.wait()

    @property
    def consuming(self) -> bool:
        return self._consuming.is_set()

    async def __aenter__(self) -> Self:
        self._runner = asyncio.create_task(self.run(), name="msgpipe-consumer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._runner is not None:
            await self._runner

    async def run(self) -> ConsumerStats:
        """Consumes until :meth:`stop`; returns the counters."""
        steps = BackoffSteps(self._reconnect)
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started, settled_before = loop.time(), self.stats.settled
            try:
                await self._session()
            except (ConnectError, _SessionLostError) as error:
                reason = str(error)
            except Exception as error:  # noqa: BLE001 - any failure of a session is retried
                reason = redact(describe(error), self._uri)
            else:
                break  # stopped
            # A session that settled a message, or lasted, was healthy: the next outage starts
            # the backoff over. One that died at once (its queue missing, say) keeps growing it.
            healthy = loop.time() - started >= self._reconnect.maximum
            if healthy or self.stats.settled > settled_before:
                steps.reset()
            wait = steps.next()
            log.warning("consumer session ended (%s); reconnecting in %.1f s", reason, wait)
            await self._sleep_unless_stopping(wait)
        await self._wait_for_handlers()
        return self.stats

    async def _session(self) -> None:
        """One connection's life: returns on stop, raises when it is lost."""
        connection = await connect(
            self._uri,
            name=self._connection_name,
            within=self._connect_timeout,
            ca_file=self._ca_file,
        )
        lost = asyncio.Event()
        reasons: list[str] = []

        def on_lost(reason: str) -> None:
            if not lost.is_set():
                reasons.append(reason)
                lost.set()

        def on_close(_sender: Any, error: BaseException | None = None) -> None:
            on_lost("connection closed" if error is None else redact(describe(error), self._uri))

        connection.close_callbacks.add(on_close)
        if not connection.connected.is_set():  # closed before the callback was in place
            on_lost("connection closed")
        copies = ConfirmChannel(connection)
        try:
            async with asyncio.timeout(self._connect_timeout):
                channel = await connection.channel(publisher_confirms=False)
                channel.close_callbacks.add(on_close)
                await channel.set_qos(prefetch_count=self._prefetch)
                await copies.channel()
                underlay = await channel.get_underlay_channel()
                queue_name = self._config.current.queue
                underlay.on_consumer_cancel_callbacks.add(
                    lambda _frame: on_lost(f"the broker cancelled the consumer on {queue_name}")
                )
                session = _Session(connection, channel, underlay, copies)
                consume_ok = await underlay.basic_consume(
                    queue_name, lambda delivered: self._on_delivery(session, delivered)
                )
            self.stats.connections += 1
            self._consuming.set()
            log.info(
                "consuming from %s (prefetch %d, concurrency %d)",
                queue_name,
                self._prefetch,
                self._concurrency,
            )
            stop = asyncio.ensure_future(self._stopping.wait())
            dead = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({stop, dead}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                dead.cancel()
            if not self._stopping.is_set():
                raise _SessionLostError(reasons[0] if reasons else "connection lost")
            # Stop: no new deliveries; the handlers in flight settle on this connection.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_SETTLE_TIMEOUT):
                    await underlay.basic_cancel(consume_ok.consumer_tag or "")
            await self._wait_for_handlers()
        finally:
            self._consuming.clear()
            await copies.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await connection.close()

    async def _on_delivery(self, session: _Session, delivered: DeliveredMessage) -> None:
        # The handler gets a task of its own, so that closing the channel does not cancel it.
        task = asyncio.create_task(self._settle(session, delivered))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, session: _Session, delivered: DeliveredMessage) -> None:
        async with self._slots:
            if self._stopping.is_set():
                return  # never handed over: given back when the channel closes
            delivery = delivered.delivery
            if not isinstance(delivery, spec.Basic.Deliver):
                return
            properties = Properties.from_amqp(delivered.header.properties)
            message = Message(
                body=delivered.body,
                properties=properties,
                exchange=delivery.exchange or "",
                routing_key=delivery.routing_key or "",
                redelivered=bool(delivery.redelivered),
                attempt=retry.retry_count(properties.headers) + 1,
                config=self._config.current,
            )
            receipt = _Receipt(session.deliveries, delivery.delivery_tag or 0)
            self.stats.delivered += 1
            try:
                await self._handler(message)
            except PermanentError as error:
                await self._move(session, receipt, message, error, retry.FailureKind.PERMANENT)
            except Exception as error:
                if not isinstance(error, RetryableError):
                    log.warning(
                        "handler raised %s for message %s",
                        type(error).__name__,
                        message.message_id,
                        exc_info=error,
                    )
                await self._move(session, receipt, message, error, retry.FailureKind.RETRYABLE)
            else:
                if await self._settle_call(receipt.ack()):
                    self.stats.acked += 1

    async def _move(
        self,
        session: _Session,
        receipt: _Receipt,
        message: Message,
        error: Exception,
        kind: retry.FailureKind,
    ) -> None:
        """Republishes a failed message where the protocol says, then acks; gives it back if
        the broker does not take the copy."""
        if isinstance(error, HandlerError):
            text = str(error) or type(error).__name__
        else:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        dest = retry.destination(message.config, message.attempt, kind)
        copy_headers = retry.failure_headers(
            message.properties.headers,
            attempt=message.attempt,
            error=text,
            at=retry.now_rfc3339(),
            delivery_exchange=message.exchange,
            delivery_routing_key=message.routing_key,
            dest=dest,
        )
        properties = retry.copy_properties(message.properties, copy_headers)
        if properties.message_id is None:
            # Without an id a consumer could not tell this copy from a duplicate.
            properties = properties.with_changes(message_id=str(uuid7()))
        try:
            await session.copies.publish(
                dest.exchange,
                retry.copy_routing_key(dest, copy_headers),
                message.body,
                properties,
                within=self._confirm_timeout,
            )
        except PublishFailure as failure:
            if failure.kind is FailureKind.TIMEOUT:
                session.copies.drop()
            await self._give_back_later(receipt, message, failure)
            return
        self._give_backs_in_a_row = 0
        acked = await self._settle_call(receipt.ack())
        match dest:
            case retry.Retry(tier=tier, delay=delay):
                log.info(
                    "retry scheduled: message %s attempt %d -> tier %d (%.3g s): %s",
                    properties.message_id,
                    message.attempt,
                    tier,
                    delay,
                    text,
                )
                if acked:
                    self.stats.retried += 1
            case retry.DeadLetter(reason=reason):
                log.warning(
                    "dead-lettered: message %s attempt %d (%s): %s",
                    properties.message_id,
                    message.attempt,
                    reason,
                    text,
                )
                if acked:
                    self.stats.dead_lettered += 1

    async def _give_back_later(
        self, receipt: _Receipt, message: Message, failure: PublishFailure
    ) -> None:
        """Rejects (requeue) a message whose copy the broker did not take, after a pause that
        grows while give-backs continue."""
        pause = self._give_back.delay(self._give_backs_in_a_row)
        self._give_backs_in_a_row += 1
        log.warning(
            "copy of message %s (attempt %d) not confirmed (%s); giving the original back to "
            "the queue in %.1f s",
            message.message_id,
            message.attempt,
            failure,
            pause,
        )
        await self._sleep_unless_stopping(pause)
        # If even the reject fails the channel is gone, and the broker requeues the message
        # itself (a closed channel counts toward delivery-limit too).
        await self._settle_call(receipt.give_back())
        self.stats.requeued += 1

    async def _settle_call(self, call: Awaitable[None]) -> bool:
        try:
            async with asyncio.timeout(_SETTLE_TIMEOUT):
                await call
        except Exception as error:  # noqa: BLE001 - the broker redelivers what was not settled
            log.debug("ack/reject not delivered (%s); the broker will redeliver", describe(error))
            return False
        return True

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _wait_for_handlers(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
