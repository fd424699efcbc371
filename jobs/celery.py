"""The Celery app. It reads the host project's Django settings (CELERY_ prefix; the
process names them with DJANGO_SETTINGS_MODULE, as for manage.py), adds the settings the
guarantees rest on where the host set none (jobs/conf.py), and schedules jobs' own
periodic work (the outbox relay, pruning, the reconciler, the canaries).
`celery -A jobs worker` finds it as `jobs.app`."""

import threading
from typing import Any

from celery import Celery, platforms
from celery.app.utils import Settings
from celery.signals import beat_init
from celery.worker.control import inspect_command
from django.conf import settings as django_settings
from kombu import Connection

from jobs.conf import CELERY_DEFAULTS, jobs_settings

# task_cls: every task, built-ins included, gets the project's base class (a DjangoTask).
app = Celery("jobs", task_cls="jobs.base:ReliableTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def beat_entries(conf: Settings) -> dict[str, dict[str, Any]]:
    """jobs' periodic work, as beat schedule entries (intervals from jobs/conf.py)."""
    entries: dict[str, dict[str, Any]] = {
        "relay-outbox": {
            "task": "jobs.tasks.relay_outbox",
            "schedule": jobs_settings.OUTBOX_RELAY_INTERVAL,
        },
        "prune-outbox": {"task": "jobs.tasks.prune_outbox", "schedule": 3600.0},
        "prune-dead-letters": {"task": "jobs.tasks.prune_dead_letters", "schedule": 86400.0},
        "reconcile": {"task": "jobs.tasks.reconcile", "schedule": jobs_settings.RECONCILE_INTERVAL},
    }
    # A canary to every declared queue (jobs/canary.py), sent by beat itself straight to
    # its queue, not through a task on `default`: a dead `default` worker cannot silence
    # the other canaries.
    for queue in conf.task_queues or ():
        entries[f"canary-{queue.name}"] = {
            "task": "jobs.tasks.canary",
            "schedule": jobs_settings.CANARY_INTERVAL,
            "args": [queue.name],
            "options": {
                "queue": queue.name,
                "expires": jobs_settings.CANARY_EXPIRES,
                "ignore_result": True,
            },
        }
    return entries


@app.on_after_configure.connect
def _reliable_defaults(sender: Celery, source: Settings, **_: Any) -> None:
    for name, value in CELERY_DEFAULTS.items():
        host = getattr(django_settings, f"CELERY_{name.upper()}", None)
        if host is None:
            # Celery's Django fixup reads this one by its old name only.
            source["CELERY_DB_REUSE_MAX" if name == "db_reuse_max" else name] = value
        elif isinstance(value, dict) and isinstance(host, dict):
            # The host's options add to jobs' (broker_transport_options): a host that sets
            # its visibility timeout keeps jobs' socket timeouts and health checks [§2].
            source[name] = {**value, **host}
    if jobs_settings.SCHEDULE:
        # The host's entries win over jobs' own of the same name.
        source["beat_schedule"] = {**beat_entries(source), **(source.beat_schedule or {})}


def queue_of(task_name: str) -> str:
    """The queue `task_routes` sends this task to; QueueNotFound when it is undeclared."""
    return str(app.amqp.router.route({}, task_name)["queue"].name)


def visibility_timeout() -> float:
    """Seconds a delivered, unacked message waits before Redis hands it out again [§2]."""
    return float(app.conf.broker_transport_options.get("visibility_timeout", 3600))


def control_connection() -> Connection:
    """A broker connection of its own for one remote-control call (ping, inspect, a
    broadcast with replies), to use in a `with` block and pass as `connection=`.

    Not one of the app's pooled connections: once the broker has restarted, a pooled
    connection left idle past its health-check interval stops reading the workers'
    replies, which wait in Redis unread; every call then finds no worker, until the
    process restarts [§10]. Connecting costs a millisecond; these calls are rare.
    """
    return app.connection_for_write()


CONSUMERS_COMMAND = "jobs_consumers"


@inspect_command(name=CONSUMERS_COMMAND)
def _consumers(state: Any) -> dict[str, Any]:
    """A worker's answer to /metrics' broadcast: the queues it consumes and its pool
    slots (jobs_queue_consumers, jobs_worker_slots). One broadcast for both, where
    `inspect active_queues` and `inspect stats` would take two."""
    consumer = state.consumer
    queues = consumer.task_consumer.queues if consumer.task_consumer else []
    return {"queues": [queue.name for queue in queues], "slots": consumer.pool.num_processes}


@beat_init.connect
def _send_quietly(sender: Any, **_: Any) -> None:
    """Beat publishes without `task-sent` events: what it sends is jobs' housekeeping
    (jobs/tasks.py, silent in the workers too) and periodic work, which Flower shows
    from the moment a worker receives it. Flower's task list stays the shop's work."""
    sender.app.conf.task_send_sent_event = False


@beat_init.connect
def _stop_between_ticks(sender: Any, **_: Any) -> None:
    """Beat stops on SIGTERM and SIGINT after its current tick, saving its schedule once.

    Celery's own handler closes the schedule's store in the signal handler, then raises
    SystemExit wherever beat happens to be. Sent mid-tick (beat publishing its due
    tasks at start), the SystemExit can be lost on the way and the loop ticks on, now
    on a closed store: beat exits 1 with "invalid operation on closed shelf" (jobs/
    NOTES.md §11). Here the handler only marks the service shut down and raises: the
    loop ends at the SystemExit or, if that was lost, at its next check, and beat's own
    `finally` saves the schedule."""

    def stop(signum: int, frame: Any) -> None:
        sender._is_shutdown.set()
        raise SystemExit()

    if threading.current_thread() is threading.main_thread():  # signals go to it alone
        platforms.signals.update(SIGTERM=stop, SIGINT=stop)
