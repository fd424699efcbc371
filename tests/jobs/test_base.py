"""The base task in this process, on a real Redis (jobs/base.py): what a delivery runs
and what it refuses (the poison guard's limit), which failures are retried and which are
not, the run's time budget, and a deferral: the copy a dependency's limit publishes
instead of a retry. (On real workers: tests/jobs/test_retry.py, test_poison.py and
tests/test_rate_limits.py.)"""

import contextlib
import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery.canvas import Signature
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from jobs import dependencies
from jobs.base import ReliableTask, _deferral_headers
from jobs.celery import app
from jobs.dependencies import Deferred, Dependency, carried
from jobs.errors import PermanentError, PoisonMessage, TransientError
from shop.tasks.emails import send_receipt
from tests.fault_tasks import defer_until
from tests.helpers import RedisServer, own_task, run_as_delivered


def counting_task(**options: object) -> tuple[ReliableTask, list[int]]:
    """A task that counts its runs and raises what `options["raises"]` holds, if anything."""
    runs: list[int] = []
    raises = options.pop("raises", None)

    def run() -> str:
        runs.append(1)
        if raises is not None:
            raise raises  # type: ignore[misc]
        return "done"

    return own_task(run=staticmethod(run), **options), runs


# -- the poison guard's limit -----------------------------------------------------------


@pytest.fixture
def counts(broker: RedisServer) -> Iterator[None]:
    """No delivery counts of this module's task ids before or after a test (a delivery
    that never finished keeps its count until its TTL, by design)."""
    keys = [f"jobs:deliveries:{task_id}:0" for task_id in ("t-poison", "t-ends")]
    broker.client().delete(*keys)
    yield
    broker.client().delete(*keys)


def test_a_delivery_past_the_limit_is_refused_as_poison_without_running(
    broker, counts, settings, monkeypatch
):
    settings.JOBS_POISON_MAX_DELIVERIES = 2
    # Each delivery's worker dies with it: none gets to say it finished.
    monkeypatch.setattr("jobs.base.delivery_finished", lambda *args: None)
    task, runs = counting_task()

    assert [run_as_delivered(task, task_id="t-poison") for _ in range(2)] == ["done", "done"]
    with pytest.raises(PoisonMessage, match="delivered 3 times without finishing"):
        run_as_delivered(task, task_id="t-poison")

    assert runs == [1, 1]  # the third delivery did not run it


@pytest.mark.parametrize("raises", [None, PermanentError("no")], ids=["done", "failed"])
def test_a_delivery_that_ends_forgets_its_count_and_the_next_starts_from_one(
    broker, counts, settings, raises
):
    settings.JOBS_POISON_MAX_DELIVERIES = 1
    task, runs = counting_task(raises=raises)

    for _ in range(3):  # one more than the limit: each ended, none is a suspect
        with contextlib.suppress(PermanentError):
            run_as_delivered(task, task_id="t-ends")

    assert runs == [1, 1, 1]
    assert broker.client().exists("jobs:deliveries:t-ends:0") == 0


# -- what is retried ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised",
    [
        PermanentError("this input can never work"),
        SoftTimeLimitExceeded(),
        Reject("refused", requeue=False),
        Ignore(),
    ],
    ids=["permanent", "soft-time-limit", "reject", "ignore"],
)
def test_what_cannot_heal_is_raised_as_it_is_and_never_retried(broker, raised):
    task, runs = counting_task(raises=raised)

    with pytest.raises(type(raised)) as caught:
        run_as_delivered(task, retries=0)

    assert caught.value is raised
    assert runs == [1]
    assert broker.queue_lengths()["default"] == 0  # no next attempt was published


@pytest.mark.parametrize(
    "raised",
    [TransientError("the dependency is down"), ZeroDivisionError()],
    ids=["transient", "bug"],
)
def test_what_may_heal_and_any_bug_is_retried_with_the_next_attempt_published(broker, raised):
    task, _ = counting_task(raises=raised, max_retries=3)

    with pytest.raises(Retry) as retried:
        run_as_delivered(task, retries=1)

    assert retried.value.exc is raised
    [raw] = broker.client().lrange("default", 0, -1)
    assert json.loads(raw)["headers"]["retries"] == 2


def test_the_last_retry_spent_fails_the_task_with_its_own_error(broker):
    raised = TransientError("still down")
    task, _ = counting_task(raises=raised, max_retries=3)

    with pytest.raises(TransientError) as failed:  # the task FAILS: a dead letter
        run_as_delivered(task, retries=3)

    assert failed.value is raised
    assert broker.queue_lengths()["default"] == 0


def test_a_task_called_directly_raises_its_error_and_retries_nothing(broker):
    task, runs = counting_task(raises=TransientError("down"), max_retries=3)
    type(task).bind(app)

    with pytest.raises(TransientError):
        task()  # a plain function call: no message to retry (Celery's retry() agrees)

    assert runs == [1]
    assert broker.queue_lengths()["default"] == 0


# -- a deferral: the call a dependency held back was never made ---------------------------


def test_a_deferral_carries_only_the_slots_its_run_has_not_used(broker, monkeypatch):
    published: list[Signature] = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **k: published.append(sig))
    headers = {dependencies.SLOTS_HEADER: json.dumps({"svc": 1.0, "other": 2.0})}
    defer_until.push_request(
        id="t-1", retries=0, args=["p", 1], kwargs={}, headers=headers, delivery_info={}
    )
    try:
        with carried({"svc": 1.0, "other": 2.0}, 1):
            Dependency("svc").admit()  # its turn on the booked slot: used up
            defer_until.defer(Deferred("svc", "throttled", 1.0))  # then a 429
    finally:
        defer_until.pop_request()

    [copy] = published
    # Carried on, the spent slot would let the next run go at once, past the 429's pause.
    assert json.loads(copy.options["headers"][dependencies.SLOTS_HEADER]) == {"other": 2.0}


def deferred_copy(
    monkeypatch: pytest.MonkeyPatch, delay: float, headers: dict[str, object], fails: bool = False
) -> tuple[object, object]:
    """What defer() publishes for a run of defer_until with these message headers, and
    the Retry it returns (or what it raised)."""
    published: list[Signature] = []

    def publish(sig: Signature, *args: object, **kwargs: object) -> None:
        if fails:
            raise ConnectionError("the broker went away")
        published.append(sig)

    monkeypatch.setattr(Signature, "apply_async", publish)
    defer_until.push_request(
        id="t-1", retries=2, args=["p", 1], kwargs={}, headers=headers, delivery_info={}
    )
    try:
        outcome: object = defer_until.defer(Deferred("svc", "throttled", delay))
    except Exception as exc:
        outcome = exc
    finally:
        defer_until.pop_request()
    return (published[0] if published else None), outcome


@pytest.mark.parametrize(("delay", "countdown"), [(0.2, 1.0), (5.0, 5.0)])
def test_a_deferred_run_comes_back_after_its_delay_and_at_least_a_second_later(
    broker, monkeypatch, delay, countdown
):
    copy, retry = deferred_copy(monkeypatch, delay, {})

    assert retry.when == countdown  # type: ignore[attr-defined]
    assert copy.options["countdown"] == countdown  # type: ignore[attr-defined]


def test_a_deferred_copy_keeps_the_messages_headers_its_attempt_and_counts_its_deferrals(
    broker, monkeypatch
):
    headers = {"x_correlation_id": "req-9", dependencies.DEFERRALS_HEADER: 2}

    copy, _ = deferred_copy(monkeypatch, 1.0, headers)

    sent = copy.options["headers"]  # type: ignore[attr-defined]
    assert sent["x_correlation_id"] == "req-9"
    assert sent[dependencies.DEFERRALS_HEADER] == 3
    assert copy.options["retries"] == 2  # type: ignore[attr-defined]  # no retry spent


def test_a_deferral_the_broker_cannot_take_rejects_the_message_without_requeueing_it(
    broker, monkeypatch
):
    copy, raised = deferred_copy(monkeypatch, 1.0, {}, fails=True)

    assert copy is None
    assert isinstance(raised, Reject)
    assert raised.requeue is False  # the reconciler finds the order; no redelivery loop


def test_a_task_called_directly_gets_its_deferral_raised_not_scheduled(tmp_path):
    with pytest.raises(Deferred):  # no broker to come back through
        defer_until(str(tmp_path / "attempts"), 1)


@pytest.mark.parametrize(
    ("timelimit", "budget"),
    [((None, None), 25), ((None, 2.0), 2.0), ((5.0, None), 5.0), ((40.0, 35.0), 35.0)],
    ids=["the-tasks-soft-limit", "the-messages-soft-limit", "the-messages-hard-limit", "own"],
)
def test_a_runs_budget_is_its_soft_limit_the_messages_own_limits_first(timelimit, budget):
    # send_receipt: soft_time_limit=25, time_limit=30
    send_receipt.push_request(timelimit=timelimit)
    try:
        assert send_receipt.run_budget() == budget
    finally:
        send_receipt.pop_request()


@pytest.mark.parametrize(
    ("request_", "read"),
    [
        ({dependencies.SLOTS_HEADER: '{"svc": 1}', dependencies.DEFERRALS_HEADER: 2}, 2),
        (
            {
                "headers": {
                    dependencies.SLOTS_HEADER: '{"svc": 1}',
                    dependencies.DEFERRALS_HEADER: 3,
                }
            },
            3,
        ),
    ],
    ids=["as-the-requests-own", "in-its-headers"],
)
def test_a_runs_booked_slots_and_deferrals_are_read_wherever_celery_put_them(request_, read):
    assert _deferral_headers(SimpleNamespace(**request_)) == ({"svc": 1.0}, read)


@pytest.mark.parametrize(
    "request_",
    [{"headers": None}, {"headers": {dependencies.SLOTS_HEADER: "not json"}}, {}],
    ids=["none", "garbage", "no-headers-at-all"],
)
def test_a_run_without_usable_deferral_headers_starts_afresh(request_):
    assert _deferral_headers(SimpleNamespace(**request_)) == ({}, 0)
