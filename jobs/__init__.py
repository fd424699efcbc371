"""The reusable reliability layer: Celery app, base task, transactional outbox.

It knows nothing of the shop (an import-linter contract enforces it), so it can be
lifted into another Django project. `celery -A jobs worker` finds `jobs.app`.
"""

from jobs.celery import app

__all__ = ("app",)
