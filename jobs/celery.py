"""The Celery app. All configuration lives in Django settings under the CELERY_ prefix."""

import os

from celery import Celery

# The one line that names the host project: the settings module every process loads.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

# task_cls: every task, built-ins included, gets the project's base class (a DjangoTask).
app = Celery("jobs", task_cls="jobs.base:ReliableTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def queue_of(task_name: str) -> str:
    """The queue `task_routes` sends this task to; QueueNotFound when it is undeclared."""
    return str(app.amqp.router.route({}, task_name)["queue"].name)
