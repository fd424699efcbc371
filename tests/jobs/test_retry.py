"""The pure backoff function, and the system check that guards the visibility timeout."""

import random
import subprocess
import sys

import pytest

from jobs.checks import visibility_timeout_check
from jobs.retry import RetryPolicy, backoff
from tests.processes import REPO


def test_backoff_ceiling_doubles_per_attempt_until_the_cap():
    ceilings = [backoff(n, base=2, cap=60, rng=_Top()) for n in range(8)]

    assert ceilings == [2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_is_full_jitter_within_the_ceiling():
    rng = random.Random(7)
    delays = [backoff(3, base=2, cap=60, rng=rng) for _ in range(2000)]

    assert all(0 <= d <= 16 for d in delays)
    assert min(delays) < 1.0
    assert max(delays) > 15.0
    assert 7 < sum(delays) / len(delays) < 9  # uniform: mean near half the ceiling


def test_backoff_survives_huge_attempt_numbers_and_rejects_nonsense():
    assert backoff(10_000, base=2, cap=60, rng=_Top()) == 60
    with pytest.raises(ValueError, match="attempt"):
        backoff(-1, base=2, cap=60)
    with pytest.raises(ValueError, match="base and cap"):
        backoff(1, base=-2, cap=60)


def test_policy_reads_the_settings(settings):
    settings.JOBS_RETRY_MAX_RETRIES = 4
    settings.JOBS_RETRY_BACKOFF_BASE = 0.5
    settings.JOBS_RETRY_BACKOFF_CAP = 9

    assert RetryPolicy.from_settings() == RetryPolicy(max_retries=4, base=0.5, cap=9)


class _Top(random.Random):
    """Always draws the top of the window, to read the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_check_passes_the_shipped_configuration():
    assert visibility_timeout_check() == []


def test_the_check_rejects_a_retry_cap_above_half_the_visibility_timeout(settings):
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 100}
    settings.JOBS_RETRY_BACKOFF_CAP = 50

    messages = [error.msg for error in visibility_timeout_check()]

    assert "The retry backoff cap (RETRY_BACKOFF_CAP) is 50 s: redelivery loop." in messages
    assert "CELERY_TASK_TIME_LIMIT is 60 s: redelivery loop." in messages
    assert "shop.tasks.reports.build_sales_report: hard time limit is 600 s: redelivery loop." in (
        messages
    )


@pytest.mark.parametrize(
    "command",
    [["manage.py", "check"], ["-m", "celery", "-A", "jobs", "worker", "-Q", "default"]],
    ids=["site", "worker"],
)
def test_the_site_and_a_worker_refuse_to_start_with_a_short_visibility_timeout(
    command, redis_server
):
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "CELERY_VISIBILITY_TIMEOUT": "100",
            "CELERY_BROKER_URL": redis_server.url,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0
    assert "jobs.E001" in result.stderr
    assert "RETRY_BACKOFF_CAP" in result.stderr
