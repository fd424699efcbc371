from typing import Any

from celery import Task, shared_task
from celery.signals import task_failure
from django.db import close_old_connections

from jobs.base import ReliableTask

# The module, not its functions: resolved at call time (and patchable in tests).
from shop.services import reports


# A long job on its own queue and worker: it can take minutes without delaying a charge.
# One at a time (shop.services.reports): a run without a ReportRun row of its own (beat's
# hourly one, a replay) claims one, or skips while another report is queued or running.
@shared_task(
    name=reports.REPORT_TASK,
    base=ReliableTask,
    bind=True,
    ignore_result=False,  # the result says where the report's file is
    soft_time_limit=reports.SOFT_TIME_LIMIT,
    time_limit=reports.TIME_LIMIT,
)
def build_sales_report(self: Task) -> str | None:
    path = reports.sales_report_run(task_id=str(self.request.id))
    return None if path is None else str(path)


@task_failure.connect
def _report_failed(sender: Task, task_id: str, **_: Any) -> None:
    """A report that failed for good (also a hard time limit, signalled in the worker's
    main process) frees the one-at-a-time slot now, not when it would count as abandoned."""
    if sender.name != build_sales_report.name:
        return
    try:
        reports.sales_report_failed(task_id=task_id)
    finally:
        close_old_connections()  # the main process's connections are not managed by Celery
