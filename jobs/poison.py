"""The poison guard: count how often one message is delivered, and stop the loop.

A message whose task kills the whole worker (an OOM kill, a segfault in a C library) is
never acked; Redis hands it to the next worker after the visibility timeout, which dies
too, forever. (A lost pool child is bounded already by task_retry_on_worker_lost.) Each
start of a task counts one delivery of (task id, retry number) in Redis; past
POISON_MAX_DELIVERIES the task fails with PoisonMessage instead of running, which acks
the message and dead-letters it.
"""

import logging

import redis
from django.conf import settings

from jobs.broker import redis_client

logger = logging.getLogger(__name__)


def delivery_count(task_id: str, retries: int) -> int:
    """Count this delivery and return how many there have been (0: could not count)."""
    client = redis_client()
    if client is None:
        return 0  # not Redis: RabbitMQ bounds redeliveries itself (quorum delivery-limit)
    key = f"jobs:deliveries:{task_id}:{retries}"
    # Long enough to see the next redeliveries, which come a visibility timeout apart.
    ttl = int(settings.CELERY_VISIBILITY_TIMEOUT * (settings.JOBS_POISON_MAX_DELIVERIES + 1))
    try:
        pipe = client.pipeline()
        pipe.incr(key)
        pipe.expire(key, ttl)
        count, _ = pipe.execute()
    except redis.RedisError as exc:
        # The guard must never fail a task; without a count the task just runs.
        logger.warning("poison guard: could not count delivery of %s: %r", task_id, exc)
        return 0
    return int(count)
