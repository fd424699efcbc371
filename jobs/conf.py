"""Every setting `jobs` reads, in one place, with its default and why.

Two kinds, both overridden by the host project's Django settings:

- `jobs`' own, read as ``jobs_settings.NAME``: the host's ``JOBS_NAME`` if it sets one,
  else the default below (``Defaults``).
- The Celery settings the guarantees rest on (``CELERY_DEFAULTS``), applied to the Celery
  app (jobs/celery.py) unless the host's settings set ``CELERY_<NAME>`` themselves. Each
  rests on a Celery, kombu or Redis behaviour written down in jobs/NOTES.md (the section
  in brackets), with the version and where to check it upstream.

Nothing here names the host: queues, routes, the broker URL and the host's own periodic
tasks are the host's settings.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings


@dataclass(frozen=True)
class Defaults:
    # --- The outbox (jobs/outbox.py) ---------------------------------------------------
    # Rows younger than this are left to the publisher registered by their own transaction.
    OUTBOX_RELAY_GRACE: float = 10.0
    OUTBOX_RELAY_INTERVAL: float = 10.0  # beat runs the relay this often
    OUTBOX_BATCH_SIZE: int = 500
    # The after-commit publish (a thread of each process) gives up on a broker that has not
    # answered in this many seconds, and the process then leaves publishing to the relay
    # for OUTBOX_PUBLISH_PAUSE seconds: a frozen Redis costs that thread about three times
    # the timeout (the publish, then the reconnect's PINGs), and the requests nothing.
    OUTBOX_PUBLISH_TIMEOUT: float = 1.0
    OUTBOX_PUBLISH_PAUSE: float = 10.0
    # A row published after its commit is marked sent this many seconds later, with the
    # others published meanwhile, in one UPDATE off the request path: far below
    # OUTBOX_RELAY_GRACE, or the relay would publish rows again that only wait for it.
    OUTBOX_MARK_INTERVAL: float = 0.5
    OUTBOX_RETENTION_DAYS: int = 7  # sent rows are pruned after this
    # A relay run stops after this many seconds (the next run goes on), well inside its
    # task's soft time limit: a slow broker never gets the run killed mid-row.
    OUTBOX_RELAY_TIME_BUDGET: float = 30.0
    # A row that fails to publish for a reason of its own (not the broker down) backs off
    # (grace, 2 x grace, ... capped at 10 minutes) and after this many failures becomes a
    # dead letter, reason `unpublishable` (about 20 minutes with the defaults).
    OUTBOX_MAX_FAILURES: int = 8

    # --- Retries and dead letters (jobs/retry.py, jobs/dead_letters.py) -----------------
    # Exponential backoff with equal jitter: retry n waits uniform(c/2, c) s, where
    # c = min(cap, base * 2**n) (jobs/retry.py says why not Celery's full jitter). The
    # budget of the defaults: ceilings 2, 4, ... 256, then 300 s four times, 1,710 s in
    # all, so a job retries for at least 14.25 and at most 28.5 minutes before it is
    # dead-lettered: a payment processor's or mail server's incident of 10 minutes
    # dead-letters nothing. Each wait stays below half the visibility timeout (a system
    # check enforces it, and that the budget rides out RETRY_OUTAGE_BUDGET). A task may set
    # its own `max_retries`, `retry_backoff` (the base) and `retry_backoff_max` (the cap).
    RETRY_MAX_RETRIES: int = 12
    RETRY_BACKOFF_BASE: float = 2.0
    RETRY_BACKOFF_CAP: float = 300.0
    # The outage (seconds) the retry budget must be sure to ride out: a shorter guaranteed
    # budget is a start-up warning (jobs.W001). 0 turns the warning off.
    RETRY_OUTAGE_BUDGET: float = 600.0
    # Replayed and discarded dead letters are pruned after this; `dead` ones never are.
    DEAD_LETTER_RETENTION_DAYS: int = 30
    # A message delivered more often than this without finishing is dead-lettered as poison
    # (at least 1: jobs.E006 refuses less).
    POISON_MAX_DELIVERIES: int = 5
    # A bulk replay publishes this many rows per transaction, pausing between batches.
    REPLAY_BATCH_SIZE: int = 100
    REPLAY_BATCH_PAUSE: float = 0.2

    # --- The services tasks call (jobs/dependencies.py) ----------------------------------
    # Per dependency, by the host's names: {"gateway": {"rate": 50, "failures": 5,
    # "cooldown": 30, "ramp": 30}}; a dependency not named has no rate limit and the
    # default breaker. Its state is in this Redis ("": the broker's).
    DEPENDENCIES: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    DEPENDENCY_REDIS_URL: str = ""
    # A call waits at most this long for its turn (and never past half of what its run
    # has left); a later turn defers the task instead, spending no retry.
    DEPENDENCY_MAX_WAIT: float = 2.0

    # --- Periodic work (scheduled by jobs itself, jobs/celery.py) -----------------------
    # False: jobs adds nothing to beat's schedule, and the host schedules the tasks of
    # jobs/tasks.py itself (jobs.celery.beat_entries() gives the entries to start from).
    SCHEDULE: bool = True
    RECONCILE_INTERVAL: float = 300.0
    # A canary to every declared queue this often (jobs/canary.py); a canary older than
    # its expiry is dropped, not run late.
    CANARY_INTERVAL: float = 30.0
    CANARY_EXPIRES: float = 60.0

    # --- Observability -------------------------------------------------------------------
    # PROMETHEUS_MULTIPROC_DIR (read by prometheus-client itself): a folder shared by the
    # processes of one host, so /metrics sums the counts of every worker child.
    # A worker on a host of its own serves its share on this port (0: off).
    WORKER_METRICS_PORT: int = 0
    FLOWER_URL: str = ""  # linked from the Operations page when set
    PROMETHEUS_URL: str = ""  # Prometheus's alerts page, linked from Operations when set


DEFAULTS = Defaults()


class _JobsSettings:
    """``jobs_settings.NAME``: the host's ``JOBS_NAME`` if set, else ``DEFAULTS.NAME``.
    Read when used, never at import time, so a test's or a host's override counts."""

    def __getattr__(self, name: str) -> Any:
        default = getattr(DEFAULTS, name)  # AttributeError: not a jobs setting
        return getattr(settings, f"JOBS_{name}", default)


jobs_settings = _JobsSettings()


# The Celery settings every guarantee of jobs rests on. Lower-case Celery names; the host
# overrides one by setting CELERY_<NAME> in its Django settings.
CELERY_DEFAULTS: dict[str, Any] = {
    # On Redis a message delivered but not acked for visibility_timeout is handed to
    # another worker. Every retry delay and hard time limit must stay well below it
    # (checked at start-up) [§2]. kombu's socket_timeout defaults to None: a publish on a
    # dead connection would hang forever and health checks would never run [§2].
    "broker_transport_options": {
        "visibility_timeout": 3600,
        "socket_timeout": 15.0,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "retry_on_timeout": True,
        "health_check_interval": 25,  # also checks the BRPOP connection since kombu 5.7 [§2]
        # How often unacked messages older than the visibility timeout are restored (the
        # sweep is throttled by interval x throttle; 1 makes every interval count) [§2].
        "unacked_restore_interval": 30.0,
        "unacked_restore_throttle": 1,
    },
    "broker_connection_retry_on_startup": True,  # workers wait for the broker, not exit
    "broker_connection_max_retries": None,  # ...for as long as it takes
    "broker_channel_error_retry": True,  # a replica demoted to read-only is retried [§2]
    "task_serializer": "json",  # JSON only: no pickle from the network
    "result_serializer": "json",
    "accept_content": ["json"],
    "task_acks_late": True,  # ack after the task ran: a crash mid-task redelivers it [§1]
    "worker_prefetch_multiplier": 1,  # with late acks, each child reserves exactly one [§1]
    "task_reject_on_worker_lost": False,  # never an unbounded requeue loop [§1]
    # A killed pool child re-sends the task like retry(): bounded by max_retries, then a
    # FAILURE that the dead-letter receiver sees [§1].
    "task_retry_on_worker_lost": True,
    "task_acks_on_failure": True,  # False on Redis silently deletes the message [§1]
    "task_acks_on_timeout": True,  # False requeues a timed-out task in a loop [§1]
    # Without it, late-ack tasks running when the broker connection drops run twice, in
    # parallel.
    "worker_cancel_long_running_tasks_on_connection_loss": True,
    # No result is stored unless the task says ignore_result=False: its result is what
    # someone reads (the shop's sales report: where its file is). A stored result cost
    # every task a transaction of four queries (make bench, scenario 9), for rows nobody
    # read: the host's own rows say what happened, the logs and Flower's events when.
    "task_ignore_result": True,
    "worker_soft_shutdown_timeout": 30.0,
    # Soft shutdown even when idle, so reserved ETA tasks are restored, not lost [§1].
    "worker_enable_soft_shutdown_on_idle": True,
    "worker_eta_task_limit": 1000,  # ETA/countdown tasks sit in worker RAM: cap them [§1]
    # Celery's Django fixup closes every database connection around every task, whatever
    # CONN_MAX_AGE says; with this it does so once per this many tasks, and
    # jobs/connections.py applies Django's own rule (CONN_MAX_AGE, health checks) around
    # each task instead.
    "db_reuse_max": 1000,
    "worker_max_tasks_per_child": 1000,  # recycle children: slow leaks cannot pile up [§6]
    "worker_max_memory_per_child": 300_000,  # KiB; a bloated child is replaced [§6]
    # Defaults for every task; slow or strict tasks set their own [§6]. A task without a
    # hard limit can hold its worker (and its message) forever.
    "task_soft_time_limit": 50,
    "task_time_limit": 60,
    # A route to an undeclared queue raises QueueNotFound instead of silently creating a
    # queue that no worker consumes [§7].
    "task_create_missing_queues": False,
    "worker_send_task_events": True,  # Flower sees tasks without `-E` on every worker [§8]
    "task_send_sent_event": True,  # ...including the SENT state [§8]
    # No STARTED row in the result backend: it cost every task one more database write.
    # Flower shows STARTED from the task-started event, and the worker logs a `started`.
    "task_track_started": False,
    # Workers log through the host's LOGGING instead of Celery replacing the root logger.
    "worker_hijack_root_logger": False,
}
