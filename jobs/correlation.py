"""The correlation id: one id from the HTTP request to every job it causes.

It starts at the request (X-Request-ID honoured when well-formed, created otherwise),
lives in a context variable while the request or task runs, is written into every
outbox row's headers, travels in the task message (and in its retries and replays), and
is stored on dead letters. Log records carry it (jobs.logs).

The message header is not called `correlation_id`: Celery's worker fills a request key
of that name from the AMQP property, which is the task id.
"""

import re
import uuid
from contextvars import ContextVar, Token

HEADER = "x_correlation_id"
HTTP_HEADER = "X-Request-ID"
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_current: ContextVar[str] = ContextVar("correlation_id", default="")


def get() -> str:
    return _current.get()


def activate(value: str) -> Token[str]:
    return _current.set(value)


def deactivate(token: Token[str]) -> None:
    _current.reset(token)


def from_client(value: str | None) -> str:
    """The client's id when it is safe to log and store as is, else a new one."""
    if value and _VALID.fullmatch(value):
        return value
    return uuid.uuid4().hex
