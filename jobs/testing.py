"""Helpers for the tests of a project that uses jobs: what a test of a service or a task
wants to say about the work it enqueued, without querying the outbox by hand.

    from jobs.testing import assert_enqueued, assert_nothing_enqueued

    checkout_complete(request=...)
    [row] = assert_enqueued(charge_payment, args=[payment.pk])

They read committed outbox rows (enqueue() writes the row in the caller's transaction),
so they work the same whether the row was published yet or not.
"""

from typing import Any

from celery import Task

from jobs.models import OutboxMessage


def _name(task: Task | str) -> str:
    return task if isinstance(task, str) else str(task.name)


def enqueued(task: Task | str | None = None) -> list[OutboxMessage]:
    """The outbox rows, oldest first; only `task`'s when given."""
    rows = OutboxMessage.objects.order_by("id")
    return list(rows if task is None else rows.filter(task_name=_name(task)))


def assert_enqueued(
    task: Task | str,
    *,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    count: int = 1,
) -> list[OutboxMessage]:
    """Assert that `count` rows of `task` (with these args and kwargs, when given) were
    enqueued, and return them. The message lists what was enqueued instead."""
    rows = [
        row
        for row in enqueued(task)
        if (args is None or row.args == list(args))
        and (kwargs is None or row.kwargs == dict(kwargs))
    ]
    if len(rows) != count:
        seen = [(row.task_name, row.args, row.kwargs) for row in enqueued()]
        wanted = f"{_name(task)} args={args} kwargs={kwargs}"
        raise AssertionError(f"expected {count} x {wanted} enqueued, found {len(rows)}: {seen}")
    return rows


def assert_nothing_enqueued(task: Task | str | None = None) -> None:
    """Assert that no row (of `task`, when given) was enqueued."""
    rows = enqueued(task)
    if rows:
        raise AssertionError(f"expected nothing enqueued, found {[r.task_name for r in rows]}")
