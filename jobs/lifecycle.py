"""Worker-side bookkeeping of every job: its correlation id while it runs, and one log
line per transition (started, retried, succeeded; failures in jobs.dead_letters)."""

import time
from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun, task_retry, task_success

from jobs import correlation
from jobs.logs import job_event

_started: dict[str, tuple[float, Any]] = {}


def request_header(request: Any, name: str) -> str:
    """A custom message header as the worker sees it ('' when absent)."""
    value = getattr(request, name, None) or (getattr(request, "headers", None) or {}).get(name)
    return str(value) if value else ""


def describe(task: Task) -> dict[str, Any]:
    request = task.request
    delivery = getattr(request, "delivery_info", None) or {}
    return {
        "task_id": request.id,
        "task_name": task.name,
        "queue": delivery.get("routing_key", ""),
        "attempt": int(getattr(request, "retries", 0) or 0) + 1,
    }


@task_prerun.connect
def _on_prerun(task_id: str, task: Task, **_: Any) -> None:
    value = request_header(task.request, correlation.HEADER) or task_id
    _started[task_id] = (time.monotonic(), correlation.activate(value))
    job_event("started", **describe(task))


@task_postrun.connect
def _on_postrun(task_id: str, **_: Any) -> None:
    started = _started.pop(task_id, None)
    if started is not None:
        correlation.deactivate(started[1])


def _duration_ms(task_id: str) -> float | None:
    started = _started.get(task_id)
    return round((time.monotonic() - started[0]) * 1000, 1) if started else None


@task_success.connect
def _on_success(sender: Task, **_: Any) -> None:
    job_event("succeeded", **describe(sender), duration_ms=_duration_ms(sender.request.id))


@task_retry.connect
def _on_retry(sender: Task, request: Any = None, reason: Any = None, **_: Any) -> None:
    job_event(
        "retried",
        **describe(sender),
        duration_ms=_duration_ms(sender.request.id),
        reason=repr(reason)[:300],
    )
