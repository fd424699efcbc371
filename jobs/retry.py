"""The retry policy: how long to wait before attempt n+1, and how many attempts."""

import random
from dataclasses import dataclass

from django.conf import settings


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retrying after failed attempt number `attempt` (0-based).

    Exponential with full jitter: uniform in [0, min(cap, base * 2**attempt)]. The jitter
    spreads retries of many failed jobs over the window instead of stampeding a
    recovering dependency at the same instant.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be >= 0")
    ceiling = min(cap, base * 2 ** min(attempt, 64))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base: float  # seconds; the first retry waits up to this long
    cap: float  # seconds; no retry waits longer (kept below the visibility timeout)

    @classmethod
    def from_settings(cls) -> "RetryPolicy":
        return cls(
            max_retries=settings.JOBS_RETRY_MAX_RETRIES,
            base=settings.JOBS_RETRY_BACKOFF_BASE,
            cap=settings.JOBS_RETRY_BACKOFF_CAP,
        )

    def delay(self, attempt: int) -> float:
        return backoff(attempt, base=self.base, cap=self.cap)
