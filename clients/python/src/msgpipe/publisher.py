"""The publisher: confirmed publishes, and a durable outbox for what the broker did not take.

:meth:`Publisher.publish` sends with ``mandatory`` on a publisher-confirm channel and returns
:attr:`Outcome.CONFIRMED` once the broker acked *and* routed the message. When the broker is
unreachable, nacks, returns the message, does not confirm in time, or the exchange does not
exist, the message is committed (fsync) to the outbox and ``publish`` returns
:attr:`Outcome.QUEUED`. While the outbox holds anything (and ``retry_pending`` is on), new
messages queue behind it, so the broker sees them in publish order. A message leaves the
outbox only after its resend is confirmed.

When the outbox is resent, oldest first (``retry_pending`` and ``retry_interval_seconds`` are
read live from ``pipeline.json``):

- when the publisher starts and as soon as the link comes (back) up, after a random pause of
  at most ``resend_jitter`` (so a fleet of publishers does not stampede a broker that just came
  back), and when ``retry_pending`` is switched on;
- every ``retry_interval_seconds`` while messages remain after a round that could not reach
  the broker;
- **while the exchange is missing** (a publisher started before its pipeline exists): the
  broker answers a publish with a channel close (404). That is said once, at warning level;
  the connection is kept (only the channel is reopened) and the oldest message is resent as a
  probe on a backoff of its own (``route_retry``: 0.5 s doubling to 4 s, no log line per
  probe). Once a probe goes through the whole outbox follows, so it is delivered within
  seconds of ``msgpipe apply`` (or the operator) creating the topology;
- messages the broker returns (no queue bound for the key) or nacks (a queue refused it) stay
  in the outbox while later ones go on, and are retried on a backoff (``refused_retry``:
  0.5 s doubling to 4 s, starting over after a round without refusals), logged once per
  streak.

``retry_pending: false`` parks the outbox, not the publisher: its messages wait on disk, and
fresh publishes go straight to the broker instead of queueing behind messages that will not
move (so, while it is off, fresh messages overtake the parked ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aio_pika.abc import AbstractConnection
from yarl import URL

from ._amqp import (
    PERSISTENT,
    ConfirmChannel,
    ConnectError,
    FailureKind,
    Properties,
    PublishFailure,
    connect,
    redact,
)
from .backoff import Backoff, BackoffSteps
from .config import PipelineConfig
from .ids import uuid7
from .live import LiveConfig
from .outbox import Outbox, OutboxEntry, OutboxError, OutboxFullError, OutboxLimits

__all__ = ["Outcome", "PublishError", "Published", "Publisher", "PublisherStats"]

log = logging.getLogger("msgpipe.publisher")

_MAX_NAME_BYTES = 255

RECONNECT = Backoff(0.2, 30.0)
"""Default waits between reconnect attempts."""
ROUTE_RETRY = Backoff(0.5, 4.0)
"""Default waits between resends while the pipeline's exchange or binding is missing. Capped
low on purpose: a publisher that waited an hour still delivers within seconds of the route
appearing, at the cost of one channel open (and, on a missing exchange, its close) per step."""
REFUSED_RETRY = Backoff(0.5, 4.0)
"""Default waits before messages the broker returned or nacked are resent: capped at 4 s like
``ROUTE_RETRY`` (protocol P-11), so a binding that comes back delivers within seconds."""


class Outcome(enum.Enum):
    """What became of a published message. Both mean it is safe."""

    CONFIRMED = "confirmed"
    """The broker confirmed the message and routed it to a queue."""
    QUEUED = "queued"
    """Committed (fsync) to the local outbox; it will be resent."""


@dataclass(frozen=True, slots=True)
class Published:
    """The outcome of :meth:`Publisher.publish` and the message's id."""

    message_id: str
    outcome: Outcome

    @property
    def confirmed(self) -> bool:
        return self.outcome is Outcome.CONFIRMED

    @property
    def queued(self) -> bool:
        return self.outcome is Outcome.QUEUED


class PublishError(Exception):
    """The message was *not* accepted (invalid, or the outbox is full or failing): the caller
    still owns it."""

    @property
    def outbox_full(self) -> bool:
        return isinstance(self.__cause__, OutboxFullError)


@dataclass(slots=True)
class PublisherStats:
    """What the publisher did since it started."""

    confirmed: int = 0
    """Publishes confirmed directly."""
    queued: int = 0
    """Publishes saved to the outbox."""
    resent: int = 0
    """Outbox messages resent and confirmed."""
    resend_rounds: int = 0
    """Resend rounds started (only while ``retry_pending`` is on and the outbox is not empty)."""
    connections: int = 0
    """Connections made (1 + reconnects)."""
    route_probes: int = 0
    """Resends tried while the pipeline's exchange was missing."""
    outbox_at_start: int = 0
    """Messages the outbox held when the publisher started (left by an earlier run)."""


class _Drain(enum.Enum):
    DONE = "done"
    ROUTE_MISSING = "route-missing"
    BROKEN = "broken"
    PARKED = "parked"


@dataclass(slots=True)
class _RouteTrouble:
    """The exchange is missing; probes follow ``steps``."""

    exchange: str
    steps: BackoffSteps
    next_probe: float


class Publisher:
    """Publishes to a pipeline's work exchange, with a durable outbox.

    ::

        async with Publisher(uri, config, "/var/lib/notes/outbox.sqlite3") as publisher:
            result = await publisher.publish(b'{"note": "hello"}')

    :meth:`start` (or ``async with``) opens the outbox and connects; when the broker is
    reachable the link is up before it returns, so the first publish is confirmed rather than
    queued. An unreachable broker is not an error: the publisher starts offline, queues, and
    keeps reconnecting in the background.
    """

    def __init__(
        self,
        uri: str,
        config: LiveConfig | PipelineConfig,
        outbox_path: str | os.PathLike[str],
        *,
        confirm_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect: Backoff = RECONNECT,
        route_retry: Backoff = ROUTE_RETRY,
        refused_retry: Backoff = REFUSED_RETRY,
        resend_batch: int = 256,
        resend_jitter: float = 0.5,
        outbox_limits: OutboxLimits | None = None,
        connection_name: str = "msgpipe-publisher",
        ca_file: str | None = None,
    ) -> None:
        self._uri = uri
        self._vhost = _vhost_of(uri)
        self._config = config if isinstance(config, LiveConfig) else LiveConfig.fixed(config)
        self._outbox_path = outbox_path
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect
        self._route_retry = route_retry
        self._resend_batch = max(resend_batch, 1)
        self._resend_jitter = resend_jitter
        self._outbox_limits = outbox_limits
        self._connection_name = connection_name
        self._ca_file = ca_file
        self._outbox: Outbox | None = None
        self._copies: ConfirmChannel | None = None
        self._route: _RouteTrouble | None = None
        self._refusals = BackoffSteps(refused_retry)
        self._refusal_logged = False
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._soon = False
        self._tasks: list[asyncio.Task[None]] = []
        self._remove_listener: Any = None
        self.stats = PublisherStats()

    def __repr__(self) -> str:
        outbox = os.fspath(self._outbox_path)
        return f"Publisher({redact(self._uri, self._uri)!r}, outbox={outbox!r})"

    @property
    def outbox_size(self) -> int:
        """Messages waiting in the outbox."""
        return len(self._outbox) if self._outbox is not None else 0

    @property
    def connected(self) -> bool:
        return self._copies is not None

    async def start(self) -> Self:
        """Opens the outbox and connects (see the class docs)."""
        if self._outbox is not None:
            return self
        self._outbox = await Outbox.open(self._outbox_path, self._outbox_limits)
        self.stats.outbox_at_start = len(self._outbox)
        if len(self._outbox):
            log.info("outbox holds %d messages from an earlier run", len(self._outbox))
        first: AbstractConnection | None = None
        try:
            first = await self._connect()
        except ConnectError as error:
            log.warning("publisher starts offline (%s); messages go to the outbox", error)
        else:
            self._install(first)
        self._remove_listener = self._config.add_listener(self._on_config_change)
        self._tasks = [
            asyncio.create_task(self._maintain_link(first), name="msgpipe-publisher-link"),
            asyncio.create_task(self._resend_loop(self._outbox), name="msgpipe-publisher-resend"),
        ]
        return self

    async def close(self) -> None:
        """Stops resending and closes the connection; the outbox keeps what is left."""
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        self._tasks = []
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._outbox is not None:
            await self._outbox.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        properties: Properties | None = None,
        exchange: str | None = None,
        routing_key: str | None = None,
    ) -> Published:
        """Publishes ``body`` to the pipeline's work exchange with its routing key (from
        ``pipeline.json``), or to ``exchange`` / ``routing_key`` when given.

        A message without an id gets a time-ordered UUID (version 7); one without a delivery
        mode is made persistent. Returns once the message is safe (:class:`Published`);
        raises :class:`PublishError` when it is not, and the caller still owns it.
        """
        outbox = self._outbox
        if outbox is None or self._stopping.is_set():
            raise PublishError("the publisher is not started, or closed")
        config = self._config.current
        exchange = config.exchange if exchange is None else exchange
        routing_key = config.routing_key if routing_key is None else routing_key
        properties, message_id = _stamp(properties, message_id, headers, content_type)
        _check(exchange, routing_key, properties)
        behind_outbox = len(outbox) > 0 and self._config.features.retry_pending
        copies = self._copies
        if not behind_outbox and copies is not None:
            try:
                await copies.publish(
                    exchange, routing_key, body, properties, within=self._confirm_timeout
                )
            except PublishFailure as failure:
                self._note_failure(failure, copies)
            else:
                self.stats.confirmed += 1
                self._route_is_back(exchange)
                return Published(message_id, Outcome.CONFIRMED)
        try:
            await outbox.append(OutboxEntry(exchange, routing_key, properties, body))
        except OutboxError as error:
            raise PublishError(f"the broker did not take the message, and {error}") from error
        self.stats.queued += 1
        self._wake_resender()  # it decides whether now is the time (link, flags, backoffs)
        return Published(message_id, Outcome.QUEUED)

    # The link: one connection, reconnected with capped backoff.

    async def _connect(self) -> AbstractConnection:
        return await connect(
            self._uri,
            name=self._connection_name,
            within=self._connect_timeout,
            ca_file=self._ca_file,
        )

    def _install(self, connection: AbstractConnection) -> None:
        self._copies = ConfirmChannel(connection)
        self.stats.connections += 1
        self._wake_resender(soon=True)

    async def _maintain_link(self, connection: AbstractConnection | None) -> None:
        steps = BackoffSteps(self._reconnect)
        down = connection is None
        while not self._stopping.is_set():
            if connection is None:
                try:
                    connection = await self._connect()
                except ConnectError as error:
                    if not down:
                        log.warning("publisher cannot reach the broker (%s); queueing", error)
                        down = True
                    await self._sleep_unless_stopping(steps.next())
                    continue
                self._install(connection)
                if down:
                    log.info("publisher connected")
            down = False
            connected_at = asyncio.get_running_loop().time()
            lost = asyncio.Event()
            connection.close_callbacks.add(_setter(lost))
            if not connection.connected.is_set():  # closed before the callback was in place
                lost.set()
            stop = asyncio.ensure_future(self._stopping.wait())
            gone = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                gone.cancel()
            copies, self._copies = self._copies, None
            if copies is not None:
                await copies.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await connection.close()
            connection = None
            if self._stopping.is_set():
                return
            log.warning("publisher lost its broker connection; reconnecting")
            down = True
            # A connection that lasted starts the backoff over; one that died young (a flapping
            # broker, a vhost that refuses us) keeps it growing: no reconnect loop.
            if asyncio.get_running_loop().time() - connected_at >= self._reconnect.maximum:
                steps.reset()
            else:
                await self._sleep_unless_stopping(steps.next())

    # Failures: a missing exchange (probed) and refused messages (retried on a backoff).

    def _note_failure(self, failure: PublishFailure, copies: ConfirmChannel) -> None:
        """A direct publish was not confirmed: the message goes to the outbox."""
        if failure.kind is FailureKind.NO_EXCHANGE:
            self._exchange_missing(failure)
        elif failure.kind is FailureKind.TIMEOUT:
            copies.drop()

    def _exchange_missing(self, failure: PublishFailure) -> None:
        """Says so once (until the route is back), and probes on a backoff from now on."""
        trouble = self._route
        if trouble is not None and trouble.exchange == failure.exchange:
            return
        log.warning(
            "exchange %s does not exist in vhost %s: is the pipeline applied? Messages wait in "
            "the outbox and are sent as soon as it exists",
            failure.exchange,
            self._vhost,
        )
        steps = BackoffSteps(self._route_retry)
        now = asyncio.get_running_loop().time()
        self._route = _RouteTrouble(failure.exchange, steps, now + steps.next())

    def _probe_failed(self, trouble: _RouteTrouble) -> None:
        # No log line per probe (protocol P-10, L-2): the warning said it once.
        trouble.next_probe = asyncio.get_running_loop().time() + trouble.steps.next()

    def _route_is_back(self, exchange: str) -> None:
        trouble = self._route
        if trouble is not None and trouble.exchange == exchange:
            log.info("exchange %s exists now; sending the outbox", exchange)
            self._route = None

    def _refused(self, failures: list[PublishFailure]) -> float:
        """Messages the broker returned or nacked stay in the outbox and are retried after the
        next step of a backoff that starts over once a round goes through; one log line per
        streak of refusals."""
        wait = self._refusals.next()
        if not self._refusal_logged:
            self._refusal_logged = True
            first = failures[0]
            if first.kind is FailureKind.UNROUTABLE:
                log.warning(
                    "exchange %s in vhost %s routes key %r to no queue: is the pipeline "
                    "applied? %d outbox messages were returned; retrying in %.1f s",
                    first.exchange,
                    self._vhost,
                    first.routing_key,
                    len(failures),
                    wait,
                )
            else:
                log.warning(
                    "the broker refused %d outbox messages (%s); retrying in %.1f s",
                    len(failures),
                    first,
                    wait,
                )
        return asyncio.get_running_loop().time() + wait

    # Resending.

    def _wake_resender(self, *, soon: bool = False) -> None:
        self._soon = self._soon or soon
        self._wake.set()

    def _on_config_change(self, old: PipelineConfig, new: PipelineConfig) -> None:
        if new.features.retry_pending and not old.features.retry_pending:
            self._wake_resender(soon=True)
        elif new.features != old.features:
            self._wake_resender()

    async def _resend_loop(self, outbox: Outbox) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval()
        refused_until = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(due - loop.time(), 0)):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            now = loop.time()
            if not self._config.features.retry_pending or not len(outbox) or self._copies is None:
                due = now + self._interval()
                continue
            not_before = max(refused_until, self._route.next_probe if self._route else 0.0)
            if now < not_before:
                due = not_before
                continue
            if self._soon:
                self._soon = False
                await self._sleep_unless_stopping(random.uniform(0, self._resend_jitter))  # noqa: S311
            try:
                end, refused = await self._drain(outbox)
            except Exception:  # the outbox stays; the next round tries again
                log.exception("resend round failed")
                end, refused = _Drain.BROKEN, []
            now = loop.time()
            refused_until = 0.0
            if end is _Drain.ROUTE_MISSING and self._route is not None:
                due = self._route.next_probe
            elif refused:
                refused_until = due = self._refused(refused)
            else:
                if end is _Drain.DONE:
                    self._refusals.reset()
                    self._refusal_logged = False
                due = now + self._interval()

    def _interval(self) -> float:
        return float(max(self._config.features.retry_interval_seconds, 1))

    async def _drain(self, outbox: Outbox) -> tuple[_Drain, list[PublishFailure]]:
        """Resends the outbox oldest first, in pipelined batches (one message, a probe, while
        the exchange is missing), until the end, a missing exchange or a broken link.
        Refused messages (returned, nacked) stay, and later ones go on."""
        self.stats.resend_rounds += 1
        after = sent = 0
        refused: list[PublishFailure] = []
        end = _Drain.DONE
        while True:
            copies = self._copies
            if not self._config.features.retry_pending or self._stopping.is_set():
                end = _Drain.PARKED
                break
            if copies is None:
                end = _Drain.BROKEN
                break
            probe = self._route
            batch = await outbox.oldest(after, 1 if probe else self._resend_batch)
            if not batch:
                break
            if probe:
                self.stats.route_probes += 1
            results = await asyncio.gather(
                *(
                    copies.publish(
                        stored.entry.exchange,
                        stored.entry.routing_key,
                        stored.entry.body,
                        stored.entry.properties,
                        within=self._confirm_timeout,
                    )
                    for stored in batch
                ),
                return_exceptions=True,
            )
            confirmed: list[int] = []
            missing: PublishFailure | None = None
            broken: PublishFailure | None = None
            for stored, result in zip(batch, results, strict=True):
                if result is None:
                    confirmed.append(stored.seq)
                elif not isinstance(result, PublishFailure):
                    raise result
                elif result.kind is FailureKind.NO_EXCHANGE:
                    missing = missing or result
                elif result.kind in (FailureKind.UNROUTABLE, FailureKind.NACKED):
                    refused.append(result)
                else:
                    broken = broken or result
            if confirmed:
                self.stats.resent += len(confirmed)
                await outbox.remove(confirmed)
                sent += len(confirmed)
            if probe is not None and refused and not confirmed:
                # The exchange exists but routed the probe nowhere (a pipeline half applied:
                # exchange declared, binding not yet). Probe again with the same message, so
                # that nothing overtakes the oldest.
                break
            if probe is not None and confirmed:
                self._route_is_back(probe.exchange)
            if missing is not None:
                if self._route is None:
                    self._exchange_missing(missing)
                else:
                    self._probe_failed(self._route)
                end = _Drain.ROUTE_MISSING
                break
            if broken is not None:
                if broken.kind is FailureKind.TIMEOUT:
                    copies.drop()
                log.debug("resend round stopped: %s", broken)
                end = _Drain.BROKEN
                break
            after = batch[-1].seq
        if sent:
            log.info("resent %d outbox messages (%d left)", sent, len(outbox))
        return end, refused

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_: event.set()


def _vhost_of(uri: str) -> str:
    try:
        path = URL(uri).path
    except ValueError:
        return "/"
    return path[1:] if len(path) > 1 else "/"


def _stamp(
    properties: Properties | None,
    message_id: str | None,
    headers: Mapping[str, Any] | None,
    content_type: str | None,
) -> tuple[Properties, str]:
    """The properties to send, with a message id (the caller's, or a new UUID v7) and
    persistence unless the caller chose otherwise; and that id."""
    if properties is None:  # the common case, without dataclasses.replace
        message_id = message_id or str(uuid7())
        stamped = Properties(
            message_id=message_id,
            headers=dict(headers) if headers else {},
            content_type=content_type,
            delivery_mode=PERSISTENT,
        )
        return stamped, message_id
    changes: dict[str, Any] = {}
    message_id = message_id or properties.message_id or str(uuid7())
    if message_id != properties.message_id:
        changes["message_id"] = message_id
    if headers is not None:
        changes["headers"] = dict(headers)
    if content_type is not None:
        changes["content_type"] = content_type
    if properties.delivery_mode is None:
        changes["delivery_mode"] = PERSISTENT
    return (properties.with_changes(**changes) if changes else properties), message_id


def _check(exchange: str, routing_key: str, properties: Properties) -> None:
    for what, value in (
        ("exchange", exchange),
        ("routing key", routing_key),
        ("message id", properties.message_id or ""),
    ):
        if len(value) * 4 > _MAX_NAME_BYTES and len(value.encode()) > _MAX_NAME_BYTES:
            raise PublishError(f"the {what} is longer than {_MAX_NAME_BYTES} bytes")
    if properties.expiration is not None and not properties.expiration.isdigit():
        raise PublishError("expiration must be a whole number of milliseconds, as text")
