"""How long the agent waits between attempts to reach the control plane."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter, between connection attempts.

    After the ``n``-th failed attempt in a row (``n`` counting from 0) the agent waits a
    random time between 0 and ``min(cap_s, base_s * 2**n)``: "full jitter", so that a
    thousand agents cut off by one control-plane restart do not all return at one instant.
    A connection that stayed up longer than ``reset_after_s`` starts the count again.
    """

    base_s: float = 0.5
    """Ceiling of the first wait, in seconds. Half a second: a control plane restarting
    under a rolling update is usually back within a few attempts."""
    cap_s: float = 30.0
    """Longest wait, in seconds; also the pause after being superseded by another process.
    30 s bounds how long an agent stays away after a long outage."""
    reset_after_s: float = 60.0
    """A connection that lasted longer than this many seconds counts as healthy, so the next
    failure waits ``base_s`` again rather than continuing the climb."""

    def __post_init__(self) -> None:
        for name in ("base_s", "cap_s", "reset_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Backoff.{name} must be a finite number >= 0, got {value!r}")
        if self.cap_s < self.base_s:
            raise ValueError(f"Backoff.cap_s ({self.cap_s}) is below base_s ({self.base_s})")

    def ceiling(self, attempt: int) -> float:
        """Return the longest wait after failed attempt number ``attempt`` (from 0)."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Return a wait drawn uniformly from ``[0, ceiling(attempt)]``."""
        return rng.uniform(0.0, self.ceiling(attempt))
