"""The SQLite outbox: order, durability across reopen, limits, the per-file lock (P-4, P-12)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from msgpipe import Outbox, OutboxEntry, OutboxError, OutboxFullError, OutboxLimits, Properties


def entry(i: int, size: int = 10) -> OutboxEntry:
    return OutboxEntry(
        "notes",
        "notes",
        Properties(message_id=f"m-{i}", headers={"x-n": i}, delivery_mode=2),
        bytes([i % 251]) * size,
    )


async def test_entries_come_back_in_publish_order_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with await Outbox.open(path) as outbox:
        seqs = [await outbox.append(entry(i)) for i in range(50)]
        assert seqs == sorted(seqs)
        await outbox.remove(seqs[:10])
        assert len(outbox) == 40
    async with await Outbox.open(path) as reopened:
        assert len(reopened) == 40
        oldest = await reopened.oldest(limit=5)
        assert [s.entry.properties.message_id for s in oldest] == [f"m-{i}" for i in range(10, 15)]
        assert oldest[0].entry == entry(10), "properties and body round-trip"
        newer = await reopened.append(entry(99))
        assert newer > oldest[-1].seq
        everything = await reopened.oldest(limit=1000)
        assert everything[-1].entry.properties.message_id == "m-99"


async def test_concurrent_appends_are_group_committed_in_call_order(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.sqlite3") as outbox:
        seqs = await asyncio.gather(*(outbox.append(entry(i)) for i in range(300)))
        assert list(seqs) == sorted(seqs)
        assert len(set(seqs)) == 300
        stored = await outbox.oldest(limit=1000)
        assert [s.entry.properties.message_id for s in stored] == [f"m-{i}" for i in range(300)]


async def test_a_full_outbox_refuses_with_a_typed_error_and_frees_space_on_remove(
    tmp_path: Path,
) -> None:
    limits = OutboxLimits(max_messages=3, max_bytes=5000)
    async with await Outbox.open(tmp_path / "o.sqlite3", limits) as outbox:
        seqs = [await outbox.append(entry(i)) for i in range(3)]
        with pytest.raises(OutboxFullError):
            await outbox.append(entry(3))
        await outbox.remove([seqs[0]])
        await outbox.append(entry(3))
        with pytest.raises(OutboxFullError):
            await outbox.append(entry(4, size=6000))
        assert [s.entry.properties.message_id for s in await outbox.oldest()] == [
            "m-1",
            "m-2",
            "m-3",
        ]


async def test_header_values_of_every_amqp_type_round_trip(tmp_path: Path) -> None:
    headers = {
        "s": "text",
        "i": 7,
        "big": 2**40,
        "f": 1.5,
        "b": True,
        "raw": b"\x00\xff",
        "d": Decimal("1.25"),
        "t": datetime(2026, 1, 1, 12, tzinfo=UTC),
        "table": {"nested": [1, "two", None]},
        "none": None,
    }
    original = OutboxEntry(
        "x", "k", Properties(message_id="m", headers=headers, expiration="500"), b""
    )
    async with await Outbox.open(tmp_path / "o.sqlite3") as outbox:
        await outbox.append(original)
        (stored,) = await outbox.oldest()
    assert stored.entry == original
    assert type(stored.entry.properties.headers["i"]) is int
    assert type(stored.entry.properties.headers["b"]) is bool


async def test_one_process_per_outbox_file(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with await Outbox.open(path):
        with pytest.raises(OutboxError, match="in use"):
            await Outbox.open(path)
    async with await Outbox.open(path):
        pass  # released on close
