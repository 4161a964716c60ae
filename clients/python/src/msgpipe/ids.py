"""Time-ordered message ids.

Python 3.11 has no ``uuid.uuid7`` (3.14 adds it), so this module makes RFC 9562 version 7
UUIDs itself: 48 bits of Unix time in milliseconds, then a 12-bit counter that keeps ids made
in the same millisecond in order (seeded at random each millisecond), then 62 random bits.
Ids from one process sort in creation order; across processes they sort by millisecond.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["uuid7"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A new version 7 UUID, greater than every one this process made before."""
    global _last_ms, _counter  # noqa: PLW0603 - one generator per process, like uuid.uuid1's clock
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms = now_ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)
