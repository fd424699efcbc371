"""The retry policy: the pure backoff function, the wait each retry is published with, the
budget it promises (shown on a real worker against a gateway outage), and the system check
that guards the visibility timeout."""

import json
import random
import time
from datetime import datetime

import pytest
from celery.exceptions import Retry, SoftTimeLimitExceeded
from django.utils import timezone

from jobs.celery import app, visibility_timeout
from jobs.checks import visibility_timeout_check
from jobs.dead_letters import failure_reason
from jobs.errors import TransientError
from jobs.models import DeadLetter
from jobs.retry import RetryPolicy, backoff, ceiling
from shop.models import Payment
from shop.services.checkout import checkout_complete, checkout_parse
from tests.helpers import Worker, own_task, role_env, run_as_delivered, run_script, wait_until


def test_backoff_ceiling_doubles_per_attempt_until_the_cap():
    ceilings = [backoff(n, base=2, cap=60, rng=_Top()) for n in range(8)]

    assert ceilings == [2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_is_equal_jitter_between_half_the_ceiling_and_the_ceiling():
    rng = random.Random(7)
    delays = [backoff(3, base=2, cap=60, rng=rng) for _ in range(2000)]

    assert all(8 <= d <= 16 for d in delays)
    assert min(delays) < 8.1
    assert max(delays) > 15.9
    assert 11.5 < sum(delays) / len(delays) < 12.5  # uniform: mean at 3/4 of the ceiling


def test_the_shipped_budget_rides_out_ten_minutes_and_stays_under_half_an_hour(settings):
    at_least, at_most = RetryPolicy.from_settings().budget()

    assert (at_least, at_most) == (855, 1710)
    assert at_least > 600  # a 10-minute incident of the gateway or the mail server
    assert visibility_timeout() / 2 > settings.JOBS_RETRY_BACKOFF_CAP


@pytest.mark.django_db(transaction=True)
def test_a_worker_on_the_shipped_policy_rides_out_an_outage_longer_than_the_old_budget(
    broker, gateway, products, start_worker, worker_env, settings
):
    # The shipped policy and a 10-minute outage, both scaled down 100 times: 6 s of outage.
    # (The policy before this one, 5 retries capped at 60 s, gave up after 62 s at most:
    # 0.62 s here.)
    scale = 100
    env = worker_env | {
        "RETRY_MAX_RETRIES": str(settings.JOBS_RETRY_MAX_RETRIES),
        "RETRY_BACKOFF_BASE": str(settings.JOBS_RETRY_BACKOFF_BASE / scale),
        "RETRY_BACKOFF_CAP": str(settings.JOBS_RETRY_BACKOFF_CAP / scale),
    }
    outage = 600 / scale
    gateway.control(outage=True)
    payments = start_worker("payments", env=env)
    request = checkout_parse(
        {
            "email": "a@b.co",
            "card_token": "tok_visa",
            "items": [{"sku": "MUG", "quantity": 1}],
        }
    )
    payment = checkout_complete(request=request).order.payment
    wait_until(
        lambda: gateway_attempts(payments) >= 3,
        timeout=20,
        what="the charge retrying",
    )
    time.sleep(outage)  # the outage goes on; nothing may be dead-lettered meanwhile
    assert not DeadLetter.objects.exists()
    gateway.control(outage=False)

    wait_until(
        lambda: Payment.objects.get(pk=payment.pk).status == "charged",
        timeout=30,
        what="the charge after the outage",
    )
    payments.stop()

    assert not DeadLetter.objects.exists()
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


def gateway_attempts(worker: Worker) -> int:
    """Retries the worker logged so far."""
    records = [json.loads(line) for line in worker.log_text().splitlines() if line[:1] == "{"]
    return sum(record.get("event") == "retried" for record in records)


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


def test_the_check_rejects_a_retry_cap_above_half_the_visibility_timeout(settings, monkeypatch):
    monkeypatch.setitem(app.conf, "broker_transport_options", {"visibility_timeout": 100})
    settings.JOBS_RETRY_BACKOFF_CAP = 50

    messages = [error.msg for error in visibility_timeout_check()]

    assert "The retry backoff cap (JOBS_RETRY_BACKOFF_CAP) is 50 s: redelivery loop." in messages
    assert "The default hard time limit (task_time_limit) is 60 s: redelivery loop." in messages
    assert "shop.tasks.reports.build_sales_report: hard time limit is 600 s: redelivery loop." in (
        messages
    )


def test_the_check_refuses_unbounded_default_retries_without_failing_itself(settings):
    settings.JOBS_RETRY_MAX_RETRIES = None

    assert [error.id for error in visibility_timeout_check()] == ["jobs.E002"]


@pytest.mark.parametrize("command", [["web"], ["worker", "default"]], ids=["site", "worker"])
def test_the_site_and_a_worker_refuse_to_start_with_a_short_visibility_timeout(
    command, redis_server
):
    result = run_script(  # as every deployment starts them
        *command,
        env=role_env(
            {
                "PATH": "/usr/bin:/bin",
                "DJANGO_SETTINGS_MODULE": "shop.settings",
                "CELERY_VISIBILITY_TIMEOUT": "100",
                "CELERY_BROKER_URL": redis_server.url,
            }
        ),
    )

    assert result.returncode != 0
    assert "jobs.E001" in result.stderr
    assert "RETRY_BACKOFF_CAP" in result.stderr


def test_a_tasks_own_retry_options_win_over_the_defaults(settings):
    settings.JOBS_RETRY_MAX_RETRIES = 7  # read when used, not at import time

    mine = own_task(max_retries=3, retry_backoff=5, retry_backoff_max=40)
    default = own_task()

    assert mine.max_retries == 3
    assert mine.retry_policy() == RetryPolicy(max_retries=3, base=5, cap=40)
    assert mine.default_retry_delay == 5  # the worker-lost retry waits this long
    assert default.max_retries == 7
    assert default.retry_policy() == RetryPolicy(max_retries=7, base=2, cap=300)


def test_the_check_judges_a_tasks_own_retry_policy(monkeypatch):
    monkeypatch.setitem(app.tasks, "tests.own_task", own_task(retry_backoff_max=2000))

    messages = [error.msg for error in visibility_timeout_check()]

    assert "tests.own_task: retry backoff cap is 2000 s: redelivery loop." in messages


def test_a_soft_time_limit_is_not_retried_and_dead_letters_as_a_time_limit(monkeypatch):
    runs = []

    def run() -> None:
        runs.append(1)
        raise SoftTimeLimitExceeded()

    task = own_task(run=staticmethod(run), max_retries=3)
    monkeypatch.setitem(app.tasks, task.name, task)

    result = task.apply()

    assert len(runs) == 1  # the same work would run out of time again: no retry
    assert isinstance(result.result, SoftTimeLimitExceeded)
    assert failure_reason(task, result.result, retries=0) == "time_limit"


def test_each_retry_is_published_to_wait_within_its_growing_backoff_window(broker):
    def run() -> None:
        raise TransientError("the dependency is down")

    task = own_task(run=staticmethod(run), max_retries=12, retry_backoff=2, retry_backoff_max=60)
    client = broker.client()

    for attempt in range(8):
        top = ceiling(attempt, base=2, cap=60)  # 2, 4, 8, 16, 32, 60, 60, 60
        before = timezone.now()
        with pytest.raises(Retry) as retried:
            run_as_delivered(task, retries=attempt)
        after = timezone.now()

        # then: the task asked for a wait in [ceiling / 2, ceiling], never none at all...
        assert top / 2 <= retried.value.when <= top
        # ...and the next attempt waits in the broker until then
        [raw] = client.lrange("default", 0, -1)
        client.delete("default")
        headers = json.loads(raw)["headers"]
        eta = datetime.fromisoformat(headers["eta"])
        assert headers["retries"] == attempt + 1
        assert (eta - before).total_seconds() >= top / 2
        assert (eta - after).total_seconds() <= top
