"""Structured logs: one line per job transition, JSON when configured.

Every record gets the current correlation id. Job transitions are logged on the
`jobs.events` logger with `event` (enqueued, published, started, retried, succeeded,
dead_lettered, replayed, discarded) and the task's id, name, queue, attempt and
duration in the record's fields, so the JSON formatter emits them as keys.
"""

import json
import logging
from datetime import UTC, datetime
from typing import Any

from jobs import correlation

events = logging.getLogger("jobs.events")

JOB_FIELDS = (
    "event",
    "task_id",
    "task_name",
    "queue",
    "attempt",
    "wait_ms",
    "duration_ms",
    "reason",
)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def job_event(event: str, **fields: Any) -> None:
    """Log one job transition: `job_event("started", task_id=..., task_name=...)`."""
    details = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))
    events.info("%s %s", event, details, extra={"event": event, **fields})


class CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "correlation_id", ""):
            record.correlation_id = correlation.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlation id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", ""),
        }
        data.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _RESERVED and key not in data and not key.startswith("_")
        )
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
