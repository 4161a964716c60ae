"""Capped exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "BackoffSteps"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits that start at ``initial`` seconds and double up to ``maximum``, each with
    ±``jitter`` (a fraction, so that a fleet of clients does not act in lockstep) and never
    longer than ``maximum``."""

    initial: float
    maximum: float
    jitter: float = 0.2

    def delay(self, step: int) -> float:
        """The wait before try ``step`` (0 = the first wait)."""
        base = min(self.initial * 2.0 ** min(step, 62), self.maximum)
        jittered = base * random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311
        return min(jittered, self.maximum)


class BackoffSteps:
    """The waits of one outage: :meth:`next` doubles, :meth:`reset` starts over."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.step = 0

    def next(self) -> float:
        wait = self.policy.delay(self.step)
        self.step += 1
        return wait

    def reset(self) -> None:
        self.step = 0
