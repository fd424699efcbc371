"""The error taxonomy every task uses to tell the retry policy what happened.

- TransientError: the world may be different next time (timeout, connection refused,
  a 5xx from a dependency). Retried with backoff, up to the task's max_retries.
- PermanentError: trying again cannot help (a request the dependency rejects as invalid,
  a row that must exist and does not). Not retried: dead-lettered at once.

Anything else (a bug, most likely) is retried like a TransientError, since a bug in a
dependency or a race may heal, and dead-lettered with its traceback when the retries run
out. A soft time limit is not retried (jobs/base.py). An expected business outcome (a
declined card) is not an error at all: the task records it and returns.
"""


class TransientError(Exception):
    """A failure that may succeed when tried again later."""

    def explain(self) -> str:
        """Why, for the operator whose action it refused (no internal names)."""
        return "a service it needs did not answer"


class PermanentError(Exception):
    """A failure that will happen again however often the task is retried."""


class PoisonMessage(PermanentError):
    """This message was delivered too often without finishing: it kills its worker."""
