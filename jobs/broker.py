"""A plain Redis client on the broker, for reads kombu does not offer (queue state) and
for the poison guard's counters. Short timeouts: these reads must fail fast, never hang."""

import os

import redis

from jobs.celery import app

_clients: dict[int, redis.Redis] = {}


def redis_client() -> redis.Redis | None:
    """This process's client, or None when the broker is not Redis."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://")):
        return None
    pid = os.getpid()  # one client per process: a prefork child must not share sockets
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    return _clients[pid]
