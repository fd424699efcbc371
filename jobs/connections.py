"""Database connections in a worker live across tasks, as they live across requests in
the web, instead of being opened anew for every task.

Celery's Django fixup closes every connection before and after each task (Celery 5.7,
`celery/fixups/django.py`: `_close_database` calls `conn.close()`), whatever
CONN_MAX_AGE says: every task paid for a new PostgreSQL connection (~2.6 ms, ten times
an insert; with the result backend's writes it was 13% of a charge's worker time,
py-spy during `make bench`). With db_reuse_max set (jobs/conf.py), the fixup closes
them only once every that many tasks. Around every task, Django's own rule applies
instead, the one it runs at the start and end of each request: a connection that
failed, was left in a transaction, or is older than CONN_MAX_AGE is closed; with
CONN_HEALTH_CHECKS a reused connection is pinged before its first query.
"""

from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(sender: Task | None = None, **_: Any) -> None:
    # An eager task runs inside its caller's transaction (a test's): leave it alone.
    if sender is not None and getattr(sender.request, "is_eager", False):
        return
    close_old_connections()
