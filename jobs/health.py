"""Readiness checks: can this process do its work right now?

/readyz answers anyone (kubelet, a load balancer), so a failed check says which one
failed in fixed words; the exception, with the hosts, ports and users it may name, goes
to the server's log only.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from jobs.celery import app

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str  # fixed words ("reachable", "unreachable"): never an exception's text
    ms: float


def _timed(name: str, probe: Callable[[], str], *, failed: str) -> Check:
    """Run `probe`; on an exception answer `failed` and log the exception (repr)."""
    start = time.monotonic()
    try:
        detail, ok = probe(), True
    except Exception as exc:
        logger.warning("readiness: %s check failed: %r", name, exc)
        detail, ok = failed, False
    return Check(ok=ok, detail=detail, ms=round((time.monotonic() - start) * 1000, 1))


def _database() -> str:
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("SELECT 1")
    return "reachable"


def _broker() -> str:
    with app.connection_for_write() as conn:
        # One attempt, a short timeout: a probe must answer fast, not wait for Redis.
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    return "reachable"


def _migrations() -> str:
    executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        raise RuntimeError(f"{len(pending)} migration(s) not applied")
    return "applied"


def readiness() -> dict[str, Check]:
    database = _timed("database", _database, failed="unreachable")
    broker = _timed("broker", _broker, failed="unreachable")
    return {
        "database": database,
        "broker": broker,
        # Without a database the migration state cannot be read; say so once.
        "migrations": (
            _timed("migrations", _migrations, failed="not applied")
            if database.ok
            else Check(False, "unknown", 0.0)
        ),
    }
