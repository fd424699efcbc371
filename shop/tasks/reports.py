from celery import shared_task

from jobs.base import ReliableTask
from shop.services.reports import sales_report_build


# A long job on its own queue and worker: it can take minutes without delaying a charge.
@shared_task(
    name="shop.tasks.reports.build_sales_report",
    base=ReliableTask,
    soft_time_limit=540,
    time_limit=600,
)
def build_sales_report() -> str:
    return str(sales_report_build())
