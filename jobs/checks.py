"""Start-up checks: refuse a configuration that makes Redis redeliver tasks in a loop,
warn about a retry budget that a short outage of a dependency exhausts, and about probes
that a pod's IP cannot reach.

On Redis a message is handed to another worker once it has been unacked for the
visibility timeout, counted from delivery. A task that runs, or waits for its retry
countdown, longer than that is delivered again, and again (jobs/NOTES.md, §2).
Every hard time limit and retry delay must stay safely below it: under half.
"""

import sys
from typing import Any

from celery.signals import beat_init, worker_init
from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning
from django.utils.module_loading import autodiscover_modules

from jobs.conf import jobs_settings
from jobs.retry import RetryPolicy


@register("jobs")
def visibility_timeout_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from jobs.base import ReliableTask
    from jobs.celery import app, visibility_timeout

    visibility = visibility_timeout()
    safe = visibility / 2
    hint = (
        f"Keep it below half the visibility timeout ({visibility:g} s), or raise the "
        "broker's visibility_timeout (which also delays recovery of a lost task)."
    )
    errors: list[CheckMessage] = []

    def require(value: float | None, what: str) -> None:
        if value is not None and value >= safe:
            errors.append(
                Error(f"{what} is {value:g} s: redelivery loop.", hint=hint, id="jobs.E001")
            )

    def rides_out(policy: RetryPolicy, what: str) -> None:
        at_least, at_most = policy.budget()
        outage = jobs_settings.RETRY_OUTAGE_BUDGET
        if at_least < outage:
            errors.append(
                CheckWarning(
                    f"{what} rides out an outage of {at_least:g} s for sure (at most "
                    f"{at_most:g} s), less than JOBS_RETRY_OUTAGE_BUDGET ({outage:g} s): a longer "
                    "outage of a dependency dead-letters every job in flight.",
                    hint="Raise JOBS_RETRY_MAX_RETRIES or JOBS_RETRY_BACKOFF_CAP (or the "
                    "task's own max_retries, retry_backoff_max).",
                    id="jobs.W001",
                )
            )

    retries = jobs_settings.RETRY_MAX_RETRIES
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return [
            Error(
                f"JOBS_RETRY_MAX_RETRIES is {retries!r}: retries must be bounded, or a job "
                "that never succeeds retries for ever and no dead letter tells anyone.",
                hint="Set it to a whole number of retries (0 or more); a task that must "
                "retry for ever says so itself with max_retries=None.",
                id="jobs.E002",
            )
        ]
    default_limit = app.conf.task_time_limit
    default = RetryPolicy.from_settings()
    require(default_limit, "The default hard time limit (task_time_limit)")
    require(default.cap, "The retry backoff cap (JOBS_RETRY_BACKOFF_CAP)")
    require(default.base, "The retry delay base (JOBS_RETRY_BACKOFF_BASE)")
    rides_out(default, "The retry policy")
    # Not app.loader.import_default_modules(): Celery's Django fixup runs the system
    # checks from that very signal, which would recurse.
    autodiscover_modules("tasks")
    # Tasks that set their own values (the defaults are checked once, above).
    for name, task in sorted(app.tasks.items()):
        time_limit = getattr(task, "time_limit", None)
        if time_limit != default_limit:
            require(time_limit, f"{name}: hard time limit")
        if isinstance(task, ReliableTask) and (policy := task.retry_policy()) != default:
            require(policy.cap, f"{name}: retry backoff cap")
            require(policy.base, f"{name}: retry backoff base")
            rides_out(policy, f"{name}: the retry policy")
    return errors


@register("jobs")
def outbox_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A published row is marked sent OUTBOX_MARK_INTERVAL later (jobs/outbox.py); the
    relay publishes unsent rows older than OUTBOX_RELAY_GRACE again. An interval that
    is not far below the grace re-sends every row. (The publishing thread publishes a row
    within half the grace or leaves it to the relay: marked within three quarters.)"""
    interval, grace = jobs_settings.OUTBOX_MARK_INTERVAL, jobs_settings.OUTBOX_RELAY_GRACE
    if 0 < interval <= grace / 4:
        return []
    return [
        Error(
            f"JOBS_OUTBOX_MARK_INTERVAL is {interval:g} s with JOBS_OUTBOX_RELAY_GRACE "
            f"{grace:g} s: the relay would publish rows again that wait to be marked sent.",
            hint="Keep the interval above 0 and at most a quarter of the grace period.",
            id="jobs.E004",
        )
    ]


@register("jobs")
def poison_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The poison guard fails a task delivered more than POISON_MAX_DELIVERIES times
    (jobs/poison.py): below 1 it would fail every task at its first delivery."""
    allowed = jobs_settings.POISON_MAX_DELIVERIES
    if isinstance(allowed, int) and not isinstance(allowed, bool) and allowed >= 1:
        return []
    return [
        Error(
            f"JOBS_POISON_MAX_DELIVERIES is {allowed!r}: every task would be dead-lettered "
            "as poison before it runs.",
            hint="Set it to a whole number of deliveries, at least 1 (the default is 5).",
            id="jobs.E006",
        )
    ]


@register("jobs")
def dependencies_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Each JOBS_DEPENDENCIES entry names known settings with usable values: a typo would
    otherwise surface only at the first call, in a worker, as a task failing."""
    from jobs.dependencies import Limits

    errors: list[CheckMessage] = []
    for name in jobs_settings.DEPENDENCIES:
        problem = ""
        try:
            limits = Limits.of(name)
            if limits.rate is not None and not limits.rate > 0:
                problem = f"rate is {limits.rate}: give calls per second, or None for no limit"
            elif limits.failures < 1:
                problem = f"failures is {limits.failures}: the breaker needs at least one"
            elif min(limits.cooldown, limits.probe_timeout) <= 0 or limits.ramp < 0:
                problem = "cooldown and probe_timeout must be above 0, ramp at least 0"
        except (TypeError, ValueError) as exc:  # an unknown setting, a number as text
            problem = str(exc)
        if problem:
            errors.append(
                Error(
                    f"JOBS_DEPENDENCIES[{name!r}]: {problem}.",
                    hint="Settings: rate, failures, cooldown, ramp, probe_timeout "
                    "(jobs/dependencies.py).",
                    id="jobs.E005",
                )
            )
    return errors


PROBES = "jobs.middleware.ProbeMiddleware"
# Middleware that validates the request's host (DisallowedHost for one not allowed).
HOST_READERS = (
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
)


@register("jobs")
def probe_middleware_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Kubelet probes and Prometheus scrapes ask for a pod by its IP, which no ALLOWED_HOSTS
    names: without ProbeMiddleware ahead of host validation they answer 400."""
    middleware = list(settings.MIDDLEWARE)
    readers = [middleware.index(name) for name in HOST_READERS if name in middleware]
    if PROBES in middleware and middleware.index(PROBES) < min(readers, default=len(middleware)):
        return []
    return [
        CheckWarning(
            f"{PROBES} is not in MIDDLEWARE ahead of host validation: /healthz, /readyz and "
            "/metrics asked for by a pod's IP (kubelet, Prometheus) answer 400 DisallowedHost.",
            hint=f"Put {PROBES} in MIDDLEWARE before {' and '.join(HOST_READERS)}.",
            id="jobs.W002",
        )
    ]


# What each of Celery's pools enforces of a task's time limits (celery/concurrency/, 5.7):
# prefork both (a signal in the child, then a kill); gevent and eventlet the hard one (a
# Timeout in the green thread); threads and solo none (they take no timeouts).
POOL_LIMITS = {
    "prefork": {"soft", "hard"},
    "gevent": {"hard"},
    "eventlet": {"hard"},
    "threads": set(),
    "solo": set(),
}


def pool_check(pool: str, queues: list[str]) -> list[CheckMessage]:
    """A pool that does not enforce the hard time limit may run a queue's tasks only if
    each caps its calls by the run's deadline (ReliableTask.bounded_calls, jobs.deadline);
    otherwise a hung call would hold its thread past every limit the project's guarantees
    count on (leases, the visibility timeout)."""
    from jobs.base import ReliableTask
    from jobs.celery import app, queue_of

    if "hard" in POOL_LIMITS.get(pool, set()):
        return []
    autodiscover_modules("tasks")
    unbounded = sorted(
        name
        for name, task in app.tasks.items()
        if not name.startswith("celery.")
        and queue_of(name) in queues
        and not (isinstance(task, ReliableTask) and task.bounded_calls)
    )
    if not unbounded:
        return []
    return [
        Error(
            f"The {pool} pool enforces no hard time limit, and these tasks of its queues "
            f"({', '.join(queues)}) do not bound their own calls: {', '.join(unbounded)}.",
            hint="Run these queues on the prefork pool, or make each task cap its timeouts "
            "with jobs.deadline.capped and set bounded_calls = True.",
            id="jobs.E003",
        )
    ]


def pool_name(pool_cls: Any) -> str:
    """The alias of a worker's pool (`-P threads`, worker_pool, or the class), as
    POOL_LIMITS names it; a custom pool by its path. Imports no pool (gevent may be
    absent)."""
    from celery.concurrency import ALIASES

    if isinstance(pool_cls, str):
        path = ALIASES.get(pool_cls) or pool_cls
    else:
        path = f"{pool_cls.__module__}:{pool_cls.__name__}"
    return next((alias for alias, target in ALIASES.items() if target == path), path)


@worker_init.connect
def refuse_a_pool_that_cannot_bound_its_tasks(sender: Any, **_: Any) -> None:
    queues = sorted(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    errors = pool_check(pool_name(sender.pool_cls), queues)
    for error in errors:
        print(f"{error.id}: {error.msg}\n  {error.hint}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


@worker_init.connect
@beat_init.connect
def refuse_to_start_with_a_redelivery_loop(**_: Any) -> None:
    """Celery's Django fixup runs the system checks but starts the worker anyway."""
    checks = [
        *visibility_timeout_check(),
        *outbox_check(),
        *poison_check(),
        *dependencies_check(),
    ]
    errors = [e for e in checks if e.is_serious()]
    if errors:
        for error in errors:
            print(f"{error.id}: {error.msg}\n  {error.hint}", file=sys.stderr)
        # SystemExit, not an Exception: Celery's signal dispatch logs and swallows those.
        raise SystemExit(1)
