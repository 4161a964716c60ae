"""The publisher's durable local outbox: messages the broker did not confirm, kept on disk in
publish order until a resend is confirmed.

One SQLite file (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: every commit is
fsync'd before the caller hears about it, so a message reported as queued survives
``kill -9`` and power loss. All SQLite work runs on one thread of its own; appends that arrive
while a commit is running are committed together in the next transaction (group commit), so a
burst of publishes during an outage costs one fsync per batch, not one per message.

One publisher process per file: the outbox holds an exclusive ``flock`` on ``<file>.lock``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from ._amqp import Properties

__all__ = ["Outbox", "OutboxEntry", "OutboxError", "OutboxFullError", "OutboxLimits", "Stored"]

_MAX_BATCH = 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL
)
"""


class OutboxError(Exception):
    """The outbox could not be opened, read or written."""


class OutboxFullError(OutboxError):
    """The message does not fit the outbox limits: the broker has been away for a while."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """How large the outbox may grow; a full outbox refuses new messages."""

    max_messages: int = 100_000
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One saved message: where it goes and what it is."""

    exchange: str
    routing_key: str
    properties: Properties
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body) + len(self.exchange) + len(self.routing_key)


@dataclass(frozen=True, slots=True)
class Stored:
    """An entry with its sequence number (publish order)."""

    seq: int
    entry: OutboxEntry


class Outbox:
    """A durable FIFO of unconfirmed messages. Open with ``await Outbox.open(path)``."""

    def __init__(
        self,
        *,
        path: Path,
        limits: OutboxLimits,
        executor: concurrent.futures.ThreadPoolExecutor,
        db: sqlite3.Connection,
        lock_file: IO[bytes],
        count: int,
        size: int,
    ) -> None:
        self.path = path
        self.limits = limits
        self._executor = executor
        self._db = db
        self._lock_file = lock_file
        self._count = count
        self._bytes = size
        self._pending: list[tuple[OutboxEntry, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], limits: OutboxLimits | None = None) -> Outbox:
        """Opens (or creates) the outbox file; :class:`OutboxError` if it is locked by another
        process or cannot be opened."""
        file = Path(path)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="msgpipe-outbox")
        loop = asyncio.get_running_loop()
        try:
            db, lock_file, count, size = await loop.run_in_executor(executor, _open, file)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(
            path=file,
            limits=limits or OutboxLimits(),
            executor=executor,
            db=db,
            lock_file=lock_file,
            count=count,
            size=size,
        )

    def __len__(self) -> int:
        return self._count

    @property
    def stored_bytes(self) -> int:
        """Stored size of the messages (bodies, exchanges and routing keys)."""
        return self._bytes

    async def append(self, entry: OutboxEntry) -> int:
        """Saves ``entry`` behind every stored message; returns its sequence number once the
        commit is on disk. :class:`OutboxFullError` when it does not fit the limits."""
        if self._closed:
            raise OutboxError("the outbox is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="msgpipe-outbox-commit")
        return await asyncio.shield(future)

    async def oldest(self, after: int = 0, limit: int = 256) -> list[Stored]:
        """The oldest ``limit`` messages whose sequence number is above ``after``."""
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._read, after, limit)
        return [
            Stored(seq, OutboxEntry(exchange, key, _decode_properties(props), bytes(body)))
            for seq, exchange, key, props, body in rows
        ]

    async def remove(self, seqs: Sequence[int]) -> None:
        """Deletes messages (after their resend was confirmed); unknown numbers are ignored."""
        if not seqs:
            return
        loop = asyncio.get_running_loop()
        removed, size = await loop.run_in_executor(self._executor, self._delete, list(seqs))
        self._count -= removed
        self._bytes -= size

    async def close(self) -> None:
        """Waits for pending commits, then closes the file and releases its lock."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_db)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            accepted: list[tuple[OutboxEntry, asyncio.Future[int]]] = []
            count, size = self._count, self._bytes
            added = 0
            for entry, future in batch:
                limits = self.limits
                if count + 1 > limits.max_messages or size + entry.size > limits.max_bytes:
                    future.set_exception(
                        OutboxFullError(
                            f"the outbox is full ({count} messages, {size} bytes; limits "
                            f"{self.limits.max_messages} messages, {self.limits.max_bytes} bytes)"
                        )
                    )
                    continue
                count += 1
                size += entry.size
                added += entry.size
                accepted.append((entry, future))
            if not accepted:
                continue
            try:
                seqs = await loop.run_in_executor(
                    self._executor, self._insert, [entry for entry, _ in accepted]
                )
            except Exception as error:  # noqa: BLE001 - every waiter hears why
                failure = OutboxError(f"cannot save to the outbox: {error}")
                for _, future in accepted:
                    if not future.done():
                        future.set_exception(failure)
                continue
            self._count += len(accepted)
            self._bytes += added
            for (_, future), seq in zip(accepted, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)

    # Everything below runs on the outbox thread.

    def _insert(self, entries: list[OutboxEntry]) -> list[int]:
        seqs = []
        with _transaction(self._db):  # one fsync'd commit
            for entry in entries:
                cursor = self._db.execute(
                    "INSERT INTO outbox (exchange, routing_key, properties, body, size)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        entry.exchange,
                        entry.routing_key,
                        _encode_properties(entry.properties),
                        entry.body,
                        entry.size,
                    ),
                )
                seqs.append(int(cursor.lastrowid or 0))
        return seqs

    def _read(self, after: int, limit: int) -> list[tuple[int, str, str, str, bytes]]:
        cursor = self._db.execute(
            "SELECT seq, exchange, routing_key, properties, body FROM outbox"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return list(cursor.fetchall())

    def _delete(self, seqs: list[int]) -> tuple[int, int]:
        removed = size = 0
        with _transaction(self._db):
            for start in range(0, len(seqs), 500):
                chunk = seqs[start : start + 500]
                marks = ",".join("?" * len(chunk))
                row = self._db.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE seq IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchone()
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)  # noqa: S608
                removed += int(row[0])
                size += int(row[1])
        return removed, size

    def _close_db(self) -> None:
        self._db.close()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _open(file: Path) -> tuple[sqlite3.Connection, IO[bytes], int, int]:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(file.with_name(file.name + ".lock"), "ab")  # noqa: SIM115 - kept open
    except OSError as error:
        raise OutboxError(f"cannot open the outbox {file}: {error.strerror}") from error
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock_file.close()
        raise OutboxError(
            f"the outbox {file} is in use by another process (one publisher per outbox file)"
        ) from error
    try:
        # Autocommit mode: transactions are opened and committed explicitly (_transaction).
        db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit
        db.execute(_SCHEMA)
        count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
    except sqlite3.Error as error:
        lock_file.close()
        raise OutboxError(f"cannot open the outbox {file}: {error}") from error
    return db, lock_file, int(count), int(size)


# Properties are stored as JSON; header values JSON cannot carry are tagged.


def _encode_properties(properties: Properties) -> str:
    data: dict[str, Any] = {}
    for item in fields(properties):
        value = getattr(properties, item.name)
        if value is None:
            continue
        if item.name == "headers":
            value = {key: _tag(v) for key, v in value.items()}
        elif item.name == "timestamp":
            value = value.isoformat()
        data[item.name] = value
    return json.dumps(data, separators=(",", ":"))


def _decode_properties(text: str) -> Properties:
    data = json.loads(text)
    if "headers" in data:
        data["headers"] = {key: _untag(v) for key, v in data["headers"].items()}
    if "timestamp" in data:
        data["timestamp"] = datetime.fromisoformat(data["timestamp"])
    return Properties(**data)


def _tag(value: Any) -> Any:
    """A header value as JSON: ``[type, value]`` for what JSON cannot tell apart."""
    match value:
        case bool() | str() | None:
            return value
        case int():
            return ["int", value]
        case float():
            return ["float", repr(value)]
        case bytes() | bytearray():
            return ["bytes", base64.b64encode(bytes(value)).decode()]
        case Decimal():
            return ["decimal", str(value)]
        case datetime():
            return ["datetime", value.isoformat()]
        case Mapping():
            return ["table", {str(k): _tag(v) for k, v in value.items()}]
        case list() | tuple():
            return ["array", [_tag(v) for v in value]]
    raise TypeError(f"a header value of type {type(value).__name__} cannot be stored")


def _untag(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    kind, raw = value
    match kind:
        case "int":
            return int(raw)
        case "float":
            return float(raw)
        case "bytes":
            return base64.b64decode(raw)
        case "decimal":
            return Decimal(raw)
        case "datetime":
            return datetime.fromisoformat(raw)
        case "table":
            return {k: _untag(v) for k, v in raw.items()}
        case "array":
            return [_untag(v) for v in raw]
    raise ValueError(f"unknown stored header type {kind!r}")
