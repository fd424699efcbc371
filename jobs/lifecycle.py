"""Bookkeeping of every job: the time it was published (a message header), and in the
worker its correlation id while it runs, one log line and the metrics per transition
(started, retried, deferred, succeeded, failed; dead letters in jobs.dead_letters)."""

import time
from datetime import datetime
from typing import Any

from celery import Task
from celery.signals import (
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_success,
    worker_ready,
)

from jobs import correlation, metrics
from jobs.celery import queue_of
from jobs.conf import jobs_settings
from jobs.dependencies import Deferred
from jobs.logs import job_event

SENT_AT_HEADER = "x_sent_at"

_started: dict[str, tuple[float, Any, tuple[str, str]]] = {}


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
        # Without a delivery (a failure seen in the main process), the route says it.
        "queue": delivery.get("routing_key") or queue_of(task.name),
        "attempt": int(getattr(request, "retries", 0) or 0) + 1,
    }


@before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every publish (first send, retry, replay) stamps the time: queue wait starts here."""
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()


def _queue_wait(request: Any) -> float | None:
    sent = request_header(request, SENT_AT_HEADER)
    if not sent:
        return None
    ready = float(sent)
    if eta := getattr(request, "eta", None):  # a countdown is not waiting in line
        ready = max(ready, datetime.fromisoformat(str(eta)).timestamp())
    return max(0.0, time.time() - ready)


def _labels(task: Task) -> tuple[str, str]:
    info = describe(task)
    return info["task_name"], info["queue"]


@task_prerun.connect
def _on_prerun(task_id: str, task: Task, **_: Any) -> None:
    value = request_header(task.request, correlation.HEADER) or task_id
    labels = _labels(task)
    _started[task_id] = (time.monotonic(), correlation.activate(value), labels)
    metrics.STARTED.labels(*labels).inc()
    wait = _queue_wait(task.request)
    if wait is not None:
        metrics.QUEUE_WAIT.labels(*labels).observe(wait)
    job_event("started", **describe(task), wait_ms=None if wait is None else round(wait * 1000, 2))


@task_postrun.connect
def _on_postrun(task_id: str, **_: Any) -> None:
    started = _started.pop(task_id, None)
    if started is not None:
        correlation.deactivate(started[1])
        metrics.BUSY.labels(*started[2]).inc(time.monotonic() - started[0])


def _duration_ms(task_id: str) -> float | None:
    started = _started.get(task_id)
    return round((time.monotonic() - started[0]) * 1000, 1) if started else None


def _observe_runtime(task: Task) -> float | None:
    duration = _duration_ms(task.request.id)
    if duration is not None:
        metrics.RUNTIME.labels(*_labels(task)).observe(duration / 1000)
    return duration


@task_success.connect
def _on_success(sender: Task, **_: Any) -> None:
    metrics.SUCCEEDED.labels(*_labels(sender)).inc()
    job_event("succeeded", **describe(sender), duration_ms=_observe_runtime(sender))


@task_failure.connect
def _on_failure(sender: Task, **_: Any) -> None:
    # In the pool child the run is timed; in the main process (child lost, hard time
    # limit) there is no start time and only the failure is counted.
    metrics.FAILED.labels(*_labels(sender)).inc()
    _observe_runtime(sender)


@task_retry.connect
def _on_retry(sender: Task, request: Any = None, reason: Any = None, **_: Any) -> None:
    deferred = getattr(reason, "exc", None)  # reason: the Retry; its exc, what caused it
    if isinstance(deferred, Deferred):
        # A call held back by a dependency's limit or breaker: no retry was spent.
        metrics.DEFERRED.labels(*_labels(sender), deferred.dependency, deferred.reason).inc()
        job_event(
            "deferred",
            **describe(sender),
            duration_ms=_observe_runtime(sender),
            dependency=deferred.dependency,
            reason=deferred.reason,
            delay_s=round(deferred.delay, 3),
        )
        return
    metrics.RETRIED.labels(*_labels(sender)).inc()
    job_event(
        "retried",
        **describe(sender),
        duration_ms=_observe_runtime(sender),
        reason=repr(reason)[:300],
    )


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """A worker on its own host exports its task metrics when WORKER_METRICS_PORT is set."""
    if jobs_settings.WORKER_METRICS_PORT:
        metrics.serve_worker_metrics(jobs_settings.WORKER_METRICS_PORT)
