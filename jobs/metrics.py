"""Prometheus metrics of the job system, exported at /metrics on the web process.

Two kinds:
- Events, counted where they happen (web, worker main processes, pool children):
  enqueued, published, started, succeeded, retried, failed, dead-lettered; run time and
  queue wait. With PROMETHEUS_MULTIPROC_DIR set, every process writes its own file and
  /metrics sums them (prometheus-client's multiprocess mode). `make run` points all its
  processes at one folder; a worker on another host exports its own share on
  JOBS_METRICS_PORT (see `serve_worker_metrics`).
- State, read at scrape time: queue depth and oldest waiting age (every Redis priority
  list), unacked deliveries and the oldest one's age (kombu's `unacked` structures),
  consumers online and their pool slots, dead letters by reason and status, outbox
  backlog, each dependency's circuit breaker state and rate limit (jobs/dependencies.py).
"""

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.broker import redis_client
from jobs.canary import canary_ages
from jobs.celery import CONSUMERS_COMMAND, app, control_connection

LABELS = ("task", "queue")
ENQUEUED = Counter("jobs_tasks_enqueued_total", "Tasks whose outbox row committed.", LABELS)
PUBLISHED = Counter("jobs_tasks_published_total", "Outbox rows handed to the broker.", LABELS)
STARTED = Counter("jobs_tasks_started_total", "Task executions started.", LABELS)
SUCCEEDED = Counter("jobs_tasks_succeeded_total", "Task executions that succeeded.", LABELS)
RETRIED = Counter("jobs_tasks_retried_total", "Task executions that asked for a retry.", LABELS)
DEFERRED = Counter(
    "jobs_tasks_deferred_total",
    "Task executions deferred without spending a retry: a dependency's rate limit, its "
    "open circuit breaker, or its 429.",
    (*LABELS, "dependency", "reason"),
)
FAILED = Counter("jobs_tasks_failed_total", "Tasks that failed for good.", LABELS)
DEAD_LETTERED = Counter(
    "jobs_dead_letters_total", "Dead letters written.", ("task", "queue", "reason")
)
RUNTIME = Histogram(
    "jobs_task_runtime_seconds",
    "Task run time.",
    LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
)
BUSY = Counter(
    "jobs_worker_busy_seconds_total",
    "Seconds pool slots spent running tasks (every run: succeeded, retried, deferred, "
    "failed). Its rate over jobs_worker_slots is the workers' utilization.",
    LABELS,
)
QUEUE_WAIT = Histogram(
    "jobs_task_queue_wait_seconds",
    "Time from publish (or ETA) to the start of the task.",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# kombu keeps each queue as one list per priority step: name, name + sep + step.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_CONSUMERS_TTL = 15.0  # seconds between `jobs_consumers` broadcasts
# queue -> (workers consuming it, their pool slots)
_consumers_cache: tuple[float, dict[str, tuple[int, int]]] = (0.0, {})


def _sent_at(raw: bytes) -> float | None:
    try:
        headers = json.loads(raw)["headers"]
        return float(headers["x_sent_at"])
    except (ValueError, KeyError, TypeError):
        return None


def _queue_state(client: Any, queues: Iterable[str], now: float) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "jobs_queue_depth", "Messages waiting in the queue.", labels=["queue"]
    )
    oldest = GaugeMetricFamily(
        "jobs_queue_oldest_age_seconds", "Age of the oldest waiting message.", labels=["queue"]
    )
    for queue in queues:
        lists = [
            queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS
        ]
        pipe = client.pipeline()
        for name in lists:
            pipe.llen(name)
            pipe.lindex(name, -1)  # BRPOP takes from the right: the next, oldest message
        replies = pipe.execute()
        depth.add_metric([queue], sum(replies[0::2]))
        ages = [now - t for raw in replies[1::2] if raw and (t := _sent_at(raw)) is not None]
        oldest.add_metric([queue], max(ages, default=0.0))
    yield depth
    yield oldest


def _unacked_state(client: Any, queues: Iterable[str], now: float) -> Iterator[Metric]:
    count = GaugeMetricFamily(
        "jobs_unacked", "Messages delivered to a worker and not acked yet.", labels=["queue"]
    )
    oldest = GaugeMetricFamily(
        "jobs_unacked_oldest_age_seconds",
        "Age of the oldest unacked delivery (redelivered at the visibility timeout).",
        labels=["queue"],
    )
    delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    counts: dict[str, int] = defaultdict(int)
    ages: dict[str, float] = defaultdict(float)
    for tag, entry in client.hgetall("unacked").items():
        try:
            queue = json.loads(entry)[2]
        except (ValueError, IndexError, TypeError):
            continue
        counts[queue] += 1
        if tag in delivered:
            ages[queue] = max(ages[queue], now - delivered[tag])
    for queue in queues:
        count.add_metric([queue], counts[queue])
        oldest.add_metric([queue], ages[queue])
    yield count
    yield oldest


def _consumers(queues: Iterable[str]) -> Iterator[Metric]:
    global _consumers_cache
    checked, per_queue = _consumers_cache
    if time.monotonic() - checked > _CONSUMERS_TTL:
        with control_connection() as connection:  # not a pooled one [§10]
            replies = app.control.broadcast(
                CONSUMERS_COMMAND, reply=True, timeout=0.5, connection=connection
            )
        counts: dict[str, tuple[int, int]] = {}
        for reply in replies or []:
            for answer in reply.values():
                for queue in answer.get("queues", []):
                    seen, held = counts.get(queue, (0, 0))
                    counts[queue] = (seen + 1, held + int(answer.get("slots", 0)))
        per_queue = counts
        _consumers_cache = (time.monotonic(), per_queue)
    workers = GaugeMetricFamily(
        "jobs_queue_consumers", "Workers consuming the queue (cached 15 s).", labels=["queue"]
    )
    slots = GaugeMetricFamily(
        "jobs_worker_slots",
        "Pool slots (processes) of the workers consuming the queue (cached 15 s).",
        labels=["queue"],
    )
    for queue in queues:
        workers.add_metric([queue], per_queue.get(queue, (0, 0))[0])
        slots.add_metric([queue], per_queue.get(queue, (0, 0))[1])
    yield workers
    yield slots


def _canaries(queues: list[str], now: float) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        "jobs_canary_age_seconds",
        "Seconds since the queue's last canary completed (+Inf: never).",
        labels=["queue"],
    )
    for queue, age in canary_ages(queues, now).items():
        gauge.add_metric([queue], age)
    yield gauge


def _database_state(now: float) -> Iterator[Metric]:
    from django.db.models import Count, Min

    from jobs.models import DeadLetter, OutboxMessage, ReconciliationFinding

    letters = GaugeMetricFamily(
        "jobs_dead_letters", "Rows in the dead-letter table.", labels=["reason", "status"]
    )
    for row in DeadLetter.objects.values("reason", "status").annotate(n=Count("id")):
        letters.add_metric([row["reason"], row["status"]], row["n"])
    yield letters
    backlog = OutboxMessage.objects.filter(
        sent_at__isnull=True, dead_lettered_at__isnull=True
    ).aggregate(n=Count("id"), oldest=Min("created_at"))
    yield GaugeMetricFamily(
        "jobs_outbox_unsent", "Outbox rows not yet published.", value=backlog["n"]
    )
    age = now - backlog["oldest"].timestamp() if backlog["oldest"] else 0.0
    yield GaugeMetricFamily(
        "jobs_outbox_oldest_unsent_age_seconds", "Age of the oldest unpublished row.", value=age
    )
    gaps = GaugeMetricFamily(
        "jobs_reconciliation_gap",
        "What each reconciliation check found wrong on its last run.",
        labels=["check"],
    )
    # A check that could not run (its dependency down) is not a check that found
    # nothing: a double-charge detector that goes blind must say so.
    failed = GaugeMetricFamily(
        "jobs_reconciliation_check_failed",
        "1 when a reconciliation check could not run on its last attempt.",
        labels=["check"],
    )
    for finding in ReconciliationFinding.objects.all():
        gaps.add_metric([finding.check_name], finding.found)
        failed.add_metric([finding.check_name], 1 if finding.error else 0)
    yield gaps
    yield failed


_BREAKER_STATES = ("closed", "half_open", "open")


def _dependencies() -> Iterator[Metric]:
    from jobs.conf import jobs_settings
    from jobs.dependencies import Dependency, Limits

    state = GaugeMetricFamily(
        "jobs_dependency_breaker_state",
        "1 for the state the dependency's circuit breaker is in (shared by all workers).",
        labels=["dependency", "state"],
    )
    rate = GaugeMetricFamily(
        "jobs_dependency_rate_limit",
        "Calls per second all workers together may make to the dependency (0: no limit).",
        labels=["dependency"],
    )
    for name in sorted(jobs_settings.DEPENDENCIES):
        current = Dependency(name).state()["state"]
        for known in _BREAKER_STATES:
            state.add_metric([name, known], 1 if current == known else 0)
        rate.add_metric([name], Limits.of(name).rate or 0)
    yield state
    yield rate


class StateCollector(Collector):
    """Reads broker and database state at scrape time. A part that cannot be read (Redis
    down) is left out of the scrape, and `jobs_scrape_errors` says which."""

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        queues = sorted(app.amqp.queues)
        errors = GaugeMetricFamily(
            "jobs_scrape_errors", "1 when a part of the state could not be read.", labels=["part"]
        )
        client = redis_client()
        try:
            broker_up = client is not None and bool(client.ping())
        except Exception:
            broker_up = False
        parts: dict[str, Any] = {"database": lambda: _database_state(now)}
        if broker_up:
            parts["queues"] = lambda: _queue_state(client, queues, now)
            parts["unacked"] = lambda: _unacked_state(client, queues, now)
            parts["consumers"] = lambda: _consumers(queues)
            parts["canaries"] = lambda: _canaries(queues, now)
            parts["dependencies"] = _dependencies
        else:  # fail fast: no inspect broadcast, no reconnect loop
            for part in ("queues", "unacked", "consumers", "canaries", "dependencies"):
                errors.add_metric([part], 1)
        for part, read in parts.items():
            try:
                metrics = list(read())
            except Exception:
                errors.add_metric([part], 1)
                continue
            errors.add_metric([part], 0)
            yield from metrics
        yield errors


def _multiprocess_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def exposition() -> tuple[bytes, str]:
    """The body and content type of /metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = _multiprocess_registry()
        registry.register(StateCollector())
    else:
        registry = REGISTRY
        if not getattr(exposition, "_registered", False):
            REGISTRY.register(StateCollector())
            exposition._registered = True  # type: ignore[attr-defined]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int) -> None:
    """Export this worker host's task metrics (all its pool children) on `port`."""
    registry = _multiprocess_registry() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else REGISTRY
    start_http_server(port, registry=registry)
