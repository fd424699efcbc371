"""The deadline of the run in progress, for the calls a task makes.

Celery's prefork pool enforces a task's time limits: the soft one raises in the task,
the hard one kills the process. A threads pool enforces neither (celery/concurrency/
thread.py, Celery 5.7, takes no timeouts): a hung call would hold its thread for as
long as the socket lets it. So each run carries a deadline (its soft time limit, set by
ReliableTask when the run starts), and a client caps every timeout it passes to its
socket by what is left: with no time left it does not call at all, and the task retries
(RunOutOfTime is transient). A socket timeout bounds one operation, not a call: an HTTP
call is a connect, a send and the reads of its answer (one for a small JSON answer, more
if a server trickles it), each capped by what was left when the call began; an SMTP
send is seven or more replies, which jobs.mail.DeadlineSMTPBackend caps one by one, so it
ends at the deadline. The start-up check (jobs/checks.py) refuses a pool without time
limits for a task that does not promise this (`ReliableTask.bounded_calls`).
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from jobs.errors import TransientError

_deadline: ContextVar[float | None] = ContextVar("jobs_run_deadline", default=None)


class RunOutOfTime(TransientError):
    """The run spent its time before this call: nothing was sent; the next attempt starts
    with a full budget."""


def remaining() -> float | None:
    """Seconds left in the current run; None outside a run with a deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def capped(timeout: float) -> float:
    """`timeout`, or less when the run has less left; RunOutOfTime when it has none."""
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise RunOutOfTime("the run's time is spent; this call was not made")
    return min(timeout, left)


@contextmanager
def running(seconds: float | None) -> Iterator[None]:
    """A run that must end within `seconds` (None: no deadline of its own). Nested in
    another run, the earlier deadline wins."""
    outer = _deadline.get()
    mine = None if seconds is None else time.monotonic() + seconds
    token = _deadline.set(min((d for d in (outer, mine) if d is not None), default=None))
    try:
        yield
    finally:
        _deadline.reset(token)
