"""The shared rate limit and circuit breaker (jobs/dependencies.py) against a real Redis:
the schedule each call books, deferring instead of waiting too long, the breaker's
states, the ramp after it closes, a 429's pause, and calling anyway without Redis.
(Across worker processes, against the real gateway: tests/test_rate_limits.py.)"""

import logging
import math
import time

import pytest

from jobs import deadline, dependencies
from jobs.checks import dependencies_check
from jobs.dependencies import Deferred, Dependency, carried

RATE = 10.0


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps admit() asks for, recorded instead of slept (the schedule is Redis's)."""
    asked: list[float] = []
    monkeypatch.setattr(dependencies, "_sleep", asked.append)
    return asked


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps admit() asks for, recorded and slept (a 429's pause is checked again
    after the wait: the clock must have moved)."""
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(dependencies, "_sleep", sleep)
    return asked


@pytest.fixture
def dependency(broker, settings) -> Dependency:
    settings.JOBS_DEPENDENCIES = {
        "svc": {"rate": RATE, "failures": 3, "cooldown": 0.5, "ramp": 0, "probe_timeout": 5}
    }
    settings.JOBS_DEPENDENCY_MAX_WAIT = 2.0
    return Dependency("svc")


def test_calls_are_booked_one_interval_apart(dependency, waits):
    for _ in range(6):
        dependency.admit()

    interval = 1 / RATE
    # The first goes at once; each next one sleeps until its slot. Redis's clock moves
    # on a little between the bookings (a few ms at most).
    assert len(waits) == 5
    for n, wait in enumerate(waits, start=1):
        assert n * interval - 0.05 <= wait <= n * interval, waits


def test_a_turn_further_than_the_max_wait_is_booked_and_the_task_deferred_to_it(
    dependency, waits, settings
):
    settings.JOBS_DEPENDENCY_MAX_WAIT = 0.25
    for _ in range(3):  # waits 0, 0.1, 0.2
        dependency.admit()

    with pytest.raises(Deferred) as deferred:
        dependency.admit()  # 0.3 s away: booked, and the task comes back then

    assert deferred.value.reason == "rate_limited"
    # It comes back half the max wait before its slot, to sleep the rest there.
    assert 0.25 - 0.125 <= deferred.value.delay <= 0.3 - 0.125
    assert deferred.value.slot is not None
    assert len(waits) == 2
    # The slot is taken: the next caller's turn is after it.
    with pytest.raises(Deferred) as after:
        dependency.admit()
    assert after.value.slot == pytest.approx(deferred.value.slot + 0.1, abs=1e-4)

    # The deferred task runs again (here at once, not at its slot: it sleeps the rest),
    # carrying its slot: it goes, booking nothing.
    settings.JOBS_DEPENDENCY_MAX_WAIT = 2.0
    with carried({"svc": deferred.value.slot}, 1):
        dependency.admit()
    assert len(waits) == 3
    assert 0.2 <= waits[-1] <= 0.3
    settings.JOBS_DEPENDENCY_MAX_WAIT = 0.25
    with pytest.raises(Deferred) as next_caller:
        dependency.admit()
    assert after.value.slot is not None
    assert next_caller.value.slot == pytest.approx(after.value.slot + 0.1, abs=1e-4)


def test_no_clock_second_has_more_sends_than_the_rate_whatever_the_slots(dependency, waits, broker):
    # Callers that all wake in one clock second (here their waits are recorded, not
    # slept: as if a stalled process sent its late calls beside others' on-time ones).
    def redis_second() -> int:
        return int(broker.client().time()[0])

    for _ in range(3):  # a try that straddles two of Redis's seconds proves nothing
        broker.forget_dependencies()
        time.sleep(math.ceil(time.time()) - time.time() + 0.01)  # a second just began
        second = redis_second()
        for _ in range(int(RATE)):
            dependency.admit()
        try:
            dependency.admit()  # this second is full: each turn it books is given up
            refused = None
        except Deferred as exc:
            refused = exc
        if redis_second() == second:
            break
    else:
        pytest.fail("three tries each straddled a clock second")

    assert refused is not None, "an eleventh call went in the same clock second"
    assert refused.reason == "rate_limited"


def test_a_turn_further_than_any_deferral_waits_books_nothing(dependency, waits, settings):
    settings.JOBS_RETRY_BACKOFF_CAP = 0.15  # the horizon
    settings.JOBS_DEPENDENCY_MAX_WAIT = 0.05
    dependency.admit()
    with pytest.raises(Deferred) as booked:
        dependency.admit()  # 0.1 s away: within the horizon
    with pytest.raises(Deferred) as beyond:
        dependency.admit()  # 0.2 s away: beyond it
    assert booked.value.slot is not None
    assert beyond.value.slot is None
    with pytest.raises(Deferred) as again:
        dependency.admit()
    assert again.value.slot is None  # still 0.2 s away: nothing was booked


def test_while_open_the_deferrals_spread_wider_each_time(dependency, waits, settings):
    settings.JOBS_DEPENDENCIES["svc"]["cooldown"] = 10.0
    for _ in range(3):
        dependency.failed()
    delays = {}
    for deferrals in (0, 3):
        with carried({}, deferrals), pytest.raises(Deferred) as deferred:
            dependency.admit()
        delays[deferrals] = deferred.value.delay
    assert 9 <= delays[0] <= 10 + 10
    assert 9 <= delays[3] <= 10 + 40  # at most four cooldowns wide
    settings.JOBS_RETRY_BACKOFF_CAP = 15.0
    with carried({}, 10), pytest.raises(Deferred) as capped:
        dependency.admit()
    assert capped.value.delay <= 15.0


def test_a_run_waits_at_most_half_of_what_it_has_left(dependency, waits):
    dependency.admit()
    dependency.admit()  # the next slot is 0.2 s away
    with deadline.running(0.3), pytest.raises(Deferred):
        dependency.admit()  # 0.15 s may be waited


def test_without_a_rate_every_call_goes_at_once(dependency, waits, settings):
    settings.JOBS_DEPENDENCIES = {"svc": {}}
    for _ in range(20):
        dependency.admit()
    assert waits == []


def test_failures_in_a_row_open_the_breaker_and_nothing_is_called(dependency, waits):
    for _ in range(2):
        dependency.failed()
    dependency.admit()  # two failures: still closed
    dependency.failed()

    with pytest.raises(Deferred) as deferred:
        dependency.admit()
    assert deferred.value.reason == "breaker_open"
    assert 0.4 <= deferred.value.delay <= 0.5 + 0.5  # the cooldown, spread over one more
    assert dependency.state()["state"] == "open"


def test_a_success_between_failures_keeps_it_closed(dependency, waits):
    for outcome in ["failed", "failed", "succeeded", "failed", "failed"]:
        getattr(dependency, outcome)()
    dependency.admit()
    assert dependency.state() == {"state": "closed", "failures": 2, "until": None}


def test_after_the_cooldown_one_probe_goes_and_its_success_closes(dependency, waits, caplog):
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)

    dependency.admit()  # the probe
    with pytest.raises(Deferred) as others:
        dependency.admit()  # the probe is out: everyone else waits
    assert others.value.reason == "breaker_open"
    assert dependency.state()["state"] == "half_open"

    with caplog.at_level(logging.WARNING, logger="jobs.dependencies"):
        dependency.succeeded()
    assert "circuit breaker closed" in caplog.text
    dependency.admit()
    assert dependency.state()["state"] == "closed"


def test_a_failed_probe_opens_it_for_another_cooldown(dependency, waits):
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)
    dependency.admit()  # the probe
    dependency.failed()

    with pytest.raises(Deferred):
        dependency.admit()
    assert dependency.state()["state"] == "open"


def test_late_answers_of_calls_made_before_it_opened_change_nothing(dependency, waits):
    for _ in range(3):
        dependency.failed()
    until = dependency.state()["until"]
    dependency.failed()  # in flight when it opened
    dependency.succeeded()

    assert dependency.state()["state"] == "open"
    assert dependency.state()["until"] == until


def test_a_probe_that_never_answers_lets_another_probe_go(dependency, waits, settings):
    settings.JOBS_DEPENDENCIES["svc"]["probe_timeout"] = 0.3
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)
    dependency.admit()  # the probe, whose process dies before it answers
    time.sleep(0.35)
    dependency.admit()  # another probe


def test_after_closing_the_rate_climbs_from_a_tenth(dependency, waits, settings):
    settings.JOBS_DEPENDENCIES["svc"]["ramp"] = 100.0
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)
    dependency.admit()  # the probe
    dependency.succeeded()

    dependency.admit()
    dependency.admit()
    # A tenth of 10 per second: one second apart, not a tenth of a second.
    assert waits == [pytest.approx(1.0, abs=0.05)]


def test_a_429_holds_every_caller_back_for_its_retry_after(dependency, slept):
    deferred = dependency.throttled(1.5)

    assert deferred.reason == "throttled"
    assert 1.5 <= deferred.delay <= 1.5 * 1.5
    dependency.admit()  # another caller: its turn comes after the pause
    assert 1.4 <= slept[-1] <= 1.5
    assert dependency.state()["state"] == "closed"  # a limit is not an outage


def test_a_caller_already_waiting_for_its_turn_when_a_429_comes_waits_out_the_pause(
    dependency, monkeypatch
):
    def sleep(seconds: float) -> None:  # while this caller waits, another gets a 429
        if not pauses:
            pauses.append(dependency.throttled(1.0))
        asked.append(seconds)
        time.sleep(seconds)

    pauses: list[Deferred] = []
    asked: list[float] = []
    monkeypatch.setattr(dependencies, "_sleep", sleep)
    dependency.admit()  # slot 0
    started = time.monotonic()
    dependency.admit()  # slot 0.1 s: the 429 comes during its wait

    assert pauses
    assert time.monotonic() - started >= 0.95  # it went after the pause, not at its slot


def test_without_redis_the_call_goes_ahead(settings, waits, caplog):
    settings.JOBS_DEPENDENCIES = {"svc": {"rate": 1.0}}
    settings.JOBS_DEPENDENCY_REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    dependency = Dependency("svc")

    with caplog.at_level(logging.WARNING, logger="jobs.dependencies"):
        for _ in range(3):
            dependency.admit()
            dependency.failed()
    assert waits == []
    assert "calling anyway" in caplog.text


def test_an_unknown_setting_is_refused(settings):
    settings.JOBS_DEPENDENCIES = {"svc": {"rate_per_second": 5}}
    with pytest.raises(ValueError, match="rate_per_second"):
        Dependency("svc").admit()


@pytest.mark.parametrize(
    ("configured", "problem"),
    [
        ({"rate_per_second": 5}, "unknown setting"),
        ({"rate": 0}, "rate is 0"),
        ({"failures": 0}, "failures is 0"),
        ({"cooldown": 0}, "cooldown"),
        ({"ramp": -1}, "ramp"),
        ({"rate": "50"}, "give a number"),
        ({"ramp": None}, "ramp is None"),
    ],
)
def test_the_start_up_check_refuses_a_dependency_it_cannot_use(settings, configured, problem):
    settings.JOBS_DEPENDENCIES = {"svc": configured, "fine": {"rate": 5}}

    [error] = dependencies_check()

    assert error.id == "jobs.E005"
    assert "'svc'" in error.msg
    assert problem in error.msg


def test_the_shipped_dependencies_pass_the_start_up_check():
    assert dependencies_check() == []


def test_a_probe_answered_429_closes_the_breaker_and_holds_the_callers(dependency, slept):
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)
    dependency.admit()  # the probe

    dependency.throttled(1.0)

    assert dependency.state()["state"] == "closed"  # it answered: it is up
    dependency.admit()
    assert 0.9 <= slept[-1] <= 1.0


def test_a_call_that_waited_for_its_turn_is_not_made_if_the_breaker_opened_meanwhile(
    dependency, monkeypatch
):
    def meanwhile(seconds: float) -> None:
        for _ in range(3):  # other calls fail while this one sleeps
            dependency.failed()

    dependency.admit()
    monkeypatch.setattr(dependencies, "_sleep", meanwhile)

    with pytest.raises(Deferred) as deferred:
        dependency.admit()  # its slot is 0.1 s away
    assert deferred.value.reason == "breaker_open"


def test_an_inconclusive_answer_hands_the_probe_on_and_closes_nothing(dependency, waits):
    for _ in range(3):
        dependency.failed()
    time.sleep(0.55)
    dependency.admit()  # the probe: a read, while the writes are what failed

    dependency.inconclusive()

    assert dependency.state()["state"] == "half_open"
    dependency.admit()  # the next caller probes at once


def test_a_deferral_explains_itself_to_an_operator_without_internal_names():
    from jobs.dependencies import Deferred

    assert Deferred("gateway", "breaker_open", 4.6).explain() == (
        "the gateway is not called for now (its circuit breaker is open after failures; about 5 s)"
    )
    assert "asked to be called less often" in Deferred("mail", "throttled", 1).explain()


def test_an_operators_call_goes_now_while_the_tasks_have_booked_every_turn(
    dependency, waits, settings
):
    settings.JOBS_RETRY_BACKOFF_CAP = 0.5  # the horizon: five turns at 10/s
    settings.JOBS_DEPENDENCY_MAX_WAIT = 0.05
    dependency.admit()
    booked = []
    while True:  # the backlog books every turn up to the horizon
        try:
            dependency.admit()
        except Deferred as exc:
            if exc.slot is None:
                break
            booked.append(exc.slot)
    assert len(booked) >= 3

    with dependencies.operator_call():
        dependency.admit()  # goes now: no Deferred, no wait

    assert waits == []
    # It took no turn: the schedule is where the backlog left it.
    with pytest.raises(Deferred) as still_busy:
        dependency.admit()
    assert still_busy.value.slot is None


def test_an_operators_calls_keep_within_the_second_and_behind_the_breaker(dependency, slept):
    time.sleep(math.ceil(time.time()) - time.time() + 0.01)  # a second just began
    with dependencies.operator_call():
        for _ in range(int(RATE)):
            dependency.admit()
        assert slept == []  # a second's worth at once: no turns, no waits
        dependency.admit()  # this second is full: it waits for the next
        assert len(slept) == 1
        assert 0 < slept[0] <= 1.0

        for _ in range(3):
            dependency.failed()
        with pytest.raises(Deferred) as deferred:
            dependency.admit()
    assert deferred.value.reason == "breaker_open"
