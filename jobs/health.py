"""Readiness checks: can this process do its work right now?"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from jobs.celery import app


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    ms: float


def _timed(probe: Callable[[], str]) -> Check:
    start = time.monotonic()
    try:
        detail, ok = probe(), True
    except Exception as exc:
        detail, ok = f"{type(exc).__name__}: {exc}"[:300], False
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
    database = _timed(_database)
    return {
        "database": database,
        "broker": _timed(_broker),
        # Without a database the migration state cannot be read; say so once.
        "migrations": _timed(_migrations) if database.ok else Check(False, "unknown", 0.0),
    }
