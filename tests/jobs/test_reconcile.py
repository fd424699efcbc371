"""The reconciler runs every check whatever one of them does: a check that raises is
recorded as one that could not run, with its last findings kept, and the checks after
it still run. In the test process: the loop is the behaviour, no worker is involved."""

import io
import logging

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from jobs.errors import TransientError
from jobs.management.commands import reconcile as reconcile_command
from jobs.models import ReconciliationFinding
from jobs.reconcile import Reconciler, Result

pytestmark = pytest.mark.django_db


def reconciler_with_a_broken_check(ran: list[str]) -> Reconciler:
    """Three checks; the middle one raises what a bug raises (not a TransientError)."""
    reconciler = Reconciler()

    @reconciler.register("before", "Registered before the broken check")
    def before(*, repair: bool) -> Result:
        ran.append("before")
        return Result(found=1, repaired=1 if repair else 0, samples=["order 1"])

    @reconciler.register("broken", "Raises")
    def broken(*, repair: bool) -> Result:
        ran.append("broken")
        raise RuntimeError("boom")

    @reconciler.register("after", "Registered after the broken check")
    def after(*, repair: bool) -> Result:
        ran.append("after")
        return Result(found=2, samples=["order 2", "order 3"])

    return reconciler


def test_a_check_that_raises_is_recorded_and_the_checks_after_it_still_run(caplog):
    # given: what the broken check found on its last run that worked
    ReconciliationFinding.objects.create(
        check_name="broken",
        description="Raises",
        found=3,
        samples=["order 9"],
        checked_at=timezone.now(),
    )
    ran: list[str] = []

    with caplog.at_level(logging.WARNING, logger="jobs.reconcile"):
        findings = reconciler_with_a_broken_check(ran).run(repair=True)

    assert ran == ["before", "broken", "after"]
    assert [f.check_name for f in findings] == ["before", "broken", "after"]
    rows = {f.check_name: f for f in ReconciliationFinding.objects.all()}
    assert (rows["before"].found, rows["before"].repaired, rows["before"].error) == (1, 1, "")
    assert (rows["after"].found, rows["after"].samples, rows["after"].error) == (
        2,
        ["order 2", "order 3"],
        "",
    )
    broken = rows["broken"]
    assert broken.error == "RuntimeError: boom"
    assert (broken.found, broken.samples) == (3, ["order 9"])  # not a reassuring zero
    [logged] = [r for r in caplog.records if "broken" in r.getMessage()]
    assert logged.exc_info is not None  # not a dependency down: the traceback is kept


def test_the_command_prints_a_check_that_could_not_run_beside_the_others_and_fails(
    monkeypatch,
):
    monkeypatch.setattr(reconcile_command, "reconciler", reconciler_with_a_broken_check([]))
    out = io.StringIO()

    with pytest.raises(CommandError, match=r"^1 check\(s\) could not run: broken$"):
        call_command("reconcile", "--dry-run", stdout=out)

    assert out.getvalue().splitlines() == [
        "before: found 1, repaired 0 (e.g. order 1)",
        "broken: found 0, repaired 0 ERROR RuntimeError: boom",
        "after: found 2, repaired 0 (e.g. order 2, order 3)",
    ]


def test_a_dependency_down_is_logged_without_a_traceback_and_a_long_error_is_cut(caplog):
    reconciler = Reconciler()

    @reconciler.register("gateway_down", "Asks a dependency that is down")
    def gateway_down(*, repair: bool) -> Result:
        raise TransientError("gateway unreachable " + "x" * 3000)

    with caplog.at_level(logging.WARNING, logger="jobs.reconcile"):
        reconciler.run()

    [logged] = [r for r in caplog.records if "gateway_down" in r.getMessage()]
    assert not logged.exc_info  # expected: an outage is no bug
    error = ReconciliationFinding.objects.get().error
    assert error.startswith("TransientError: gateway unreachable x")
    assert len(error) == 2000


def test_a_finding_keeps_20_samples_and_only_a_check_that_found_something_warns(caplog):
    reconciler = Reconciler()

    @reconciler.register("many", "Finds 25")
    def many(*, repair: bool) -> Result:
        return Result(found=25, samples=[f"order {n}" for n in range(25)])

    @reconciler.register("none", "Finds nothing")
    def none(*, repair: bool) -> Result:
        return Result(found=0)

    with caplog.at_level(logging.WARNING, logger="jobs.reconcile"):
        reconciler.run()

    samples = ReconciliationFinding.objects.get(check_name="many").samples
    assert samples == [f"order {n}" for n in range(20)]
    assert [r.getMessage() for r in caplog.records] == ["reconcile: many found 25, repaired 0"]


def test_a_run_repairs_unless_told_not_to():
    reconciler, asked = Reconciler(), []

    @reconciler.register("records", "Records whether it may repair")
    def records(*, repair: bool) -> Result:
        asked.append(repair)
        return Result(found=0)

    reconciler.run()
    reconciler.run(repair=False)

    assert asked == [True, False]
