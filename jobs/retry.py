"""The retry policy: how long to wait before attempt n+1, how many attempts, and the
outage the whole budget is sure to ride out."""

import math
import random
from dataclasses import dataclass

from jobs.conf import jobs_settings


def ceiling(attempt: int, *, base: float, cap: float) -> float:
    """The longest wait after failed attempt number `attempt` (0-based): base * 2**n, capped."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be >= 0")
    return min(cap, base * 2 ** min(attempt, 64))


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retrying after failed attempt number `attempt` (0-based).

    Exponential with "equal jitter": uniform in [ceiling / 2, ceiling]. The jitter spreads
    the retries of many failed jobs over the window instead of stampeding a recovering
    dependency at the same instant; the floor makes the budget a promise: the retries
    together wait at least half the sum of their ceilings, so an outage shorter than that
    never dead-letters a job. (Celery's own `retry_jitter` is full jitter,
    `random.randrange(countdown + 1)` in celery/utils/time.py,
    get_exponential_backoff_interval, Celery 5.7: every wait may be near zero, and no
    outage can be promised to be ridden out. That is why the policy is not Celery's.)
    """
    top = ceiling(attempt, base=base, cap=cap)
    return (rng or random).uniform(top / 2, top)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int | None  # None: Celery's "retry for ever" (celery.chord_unlock's)
    base: float  # seconds; the first retry waits up to this long
    cap: float  # seconds; no retry waits longer (kept below half the visibility timeout)

    @classmethod
    def from_settings(cls) -> "RetryPolicy":
        return cls(
            max_retries=jobs_settings.RETRY_MAX_RETRIES,
            base=jobs_settings.RETRY_BACKOFF_BASE,
            cap=jobs_settings.RETRY_BACKOFF_CAP,
        )

    def delay(self, attempt: int) -> float:
        return backoff(attempt, base=self.base, cap=self.cap)

    def budget(self) -> tuple[float, float]:
        """(at least, at most) seconds from the first failure to the last attempt.

        A dependency that is down for less than the first figure never exhausts a job's
        retries (attempts themselves take time too, which only lengthens the budget).
        """
        if self.max_retries is None:
            return math.inf, math.inf
        top = sum(ceiling(n, base=self.base, cap=self.cap) for n in range(self.max_retries))
        return top / 2, top
