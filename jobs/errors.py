"""The error taxonomy every task uses to tell the retry policy what happened.

- TransientError: the world may be different next time (timeout, connection refused,
  a 5xx from a dependency). Retried with backoff, up to the task's max_retries.
- PermanentError: trying again cannot help (card declined, invalid data). Not retried.

Anything else is a bug: it is not retried and surfaces as a task failure.
"""


class TransientError(Exception):
    """A failure that may succeed when tried again later."""


class PermanentError(Exception):
    """A failure that will happen again however often the task is retried."""


class PoisonMessage(PermanentError):
    """This message was delivered too often without finishing: it kills its worker."""
