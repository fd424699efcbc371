"""Canaries: a tiny task sent to every queue on a short period. The age of the last one
completed on a queue tells whether anything consumes it, even when its workers answer
pings but have stopped taking messages (celery #8030, #4453)."""

import time

from jobs.broker import redis_client
from jobs.celery import app

KEY = "jobs:canary:{queue}"
TASK = "jobs.tasks.canary"


def canary_send(*, expires: float = 60.0) -> list[str]:
    """Send one canary to each declared queue; a canary nobody takes in time expires."""
    queues = sorted(app.amqp.queues)
    for queue in queues:
        app.send_task(TASK, args=[queue], queue=queue, expires=expires, ignore_result=True)
    return queues


def canary_record(queue: str) -> None:
    client = redis_client()
    if client is not None:
        client.set(KEY.format(queue=queue), time.time())


def canary_ages(queues: list[str], now: float) -> dict[str, float]:
    """Seconds since each queue's last canary completed (inf: never)."""
    client = redis_client()
    if client is None:
        return {}
    values = client.mget([KEY.format(queue=queue) for queue in queues])
    return {
        queue: now - float(value) if value else float("inf")
        for queue, value in zip(queues, values, strict=True)
    }
