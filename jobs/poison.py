"""The poison guard: count how often one message is delivered, and stop the loop.

A message whose task kills the whole worker (an OOM kill, a segfault in a C library) is
never acked; Redis hands it to the next worker after the visibility timeout, which dies
too, forever. (A lost pool child is bounded already by task_retry_on_worker_lost.) Each
start of a task counts one delivery of (task id, retry number) in Redis; past
POISON_MAX_DELIVERIES the task fails with PoisonMessage instead of running, which acks
the message and dead-letters it.

The count only matters while its delivery might come back: a run that ends (succeeds,
fails, or schedules its retry, which is counted under the next retry number) deletes it
at once, so Redis holds one key per task that is running or died running, not one per
task ever run. The TTL is the backstop for a worker that died and was never redelivered.
"""

import logging

import redis

from jobs.broker import redis_client
from jobs.celery import visibility_timeout
from jobs.conf import jobs_settings

logger = logging.getLogger(__name__)


def _key(task_id: str, retries: int) -> str:
    return f"jobs:deliveries:{task_id}:{retries}"


def delivery_count(task_id: str, retries: int) -> int | None:
    """Count this delivery and return how many there have been (None: could not count)."""
    client = redis_client()
    if client is None:
        return None  # not Redis: RabbitMQ bounds redeliveries itself (quorum delivery-limit)
    key = _key(task_id, retries)
    # Long enough to see the next redeliveries, which come a visibility timeout apart.
    ttl = int(visibility_timeout() * (jobs_settings.POISON_MAX_DELIVERIES + 1))
    try:
        pipe = client.pipeline()
        pipe.incr(key)
        pipe.expire(key, ttl)
        count, _ = pipe.execute()
    except redis.RedisError as exc:
        # The guard must never fail a task; without a count the task just runs.
        logger.warning("poison guard: could not count delivery of %s: %r", task_id, exc)
        return None
    return int(count)


def delivery_finished(task_id: str, retries: int) -> None:
    """This delivery ended without killing its worker: forget its count."""
    client = redis_client()
    if client is None:
        return
    try:
        client.delete(_key(task_id, retries))
    except redis.RedisError as exc:
        # The key expires by itself; a task must never fail because of the guard.
        logger.warning("poison guard: could not forget delivery of %s: %r", task_id, exc)
