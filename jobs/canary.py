"""Canaries: a tiny task sent to every queue on a short period. The age of the last one
completed on a queue tells whether anything consumes it, even when its workers answer
pings but have stopped taking messages (celery #8030, #4453)."""

import time

from jobs.broker import redis_client
from jobs.celery import app, beat_entries

KEY = "jobs:canary:{queue}"
TASK = "jobs.tasks.canary"


def canary_send() -> list[str]:
    """Send now the canaries beat sends every CANARY_INTERVAL (jobs.celery.beat_entries):
    one straight to each declared queue, expiring after CANARY_EXPIRES if nobody takes it.
    Returns the queues."""
    queues = []
    for entry in beat_entries(app.conf).values():
        if entry["task"] == TASK:
            app.send_task(TASK, args=entry["args"], **entry["options"])
            queues.append(entry["args"][0])
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
