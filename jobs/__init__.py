"""The reusable reliability layer: Celery app, base task, transactional outbox, dead
letters, reconciler, probes and metrics.

It knows nothing of the shop (an import-linter contract enforces it, and
tests/liftproject runs it in a project of its own): jobs/README.md says how to lift it.
`celery -A jobs worker` finds `jobs.app`.
"""

from jobs.celery import app

__all__ = ("app",)
