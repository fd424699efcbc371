"""A run's deadline caps the timeouts of the calls made in it (jobs.deadline)."""

import pytest

from jobs import deadline


def test_outside_a_run_timeouts_are_left_as_they_are():
    assert deadline.remaining() is None
    assert deadline.capped(15.0) == 15.0


def test_inside_a_run_a_timeout_never_exceeds_what_is_left(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(deadline.time, "monotonic", lambda: clock[0])

    with deadline.running(20):
        assert deadline.capped(15.0) == 15.0
        clock[0] += 12
        assert deadline.capped(15.0) == 8.0
        clock[0] += 8
        with pytest.raises(deadline.RunOutOfTime):
            deadline.capped(15.0)
    assert deadline.remaining() is None  # the run ended: no deadline after it


def test_a_run_inside_another_keeps_the_earlier_deadline(monkeypatch):
    monkeypatch.setattr(deadline.time, "monotonic", lambda: 1000.0)

    with deadline.running(2), deadline.running(25):
        assert deadline.remaining() == 2.0


def test_a_run_without_a_budget_has_no_deadline():
    with deadline.running(None):
        assert deadline.capped(15.0) == 15.0
