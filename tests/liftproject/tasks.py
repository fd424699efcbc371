from celery import shared_task
from django.db.models import F
from django.utils import timezone

from jobs.base import ReliableTask
from jobs.errors import TransientError
from tests.liftproject.models import Greeting


@shared_task(base=ReliableTask, name="lift.greet")
def greet(greeting_id: int) -> None:
    # Idempotent: a second run finds it greeted and changes nothing.
    Greeting.objects.filter(pk=greeting_id, greeted_at=None).update(greeted_at=timezone.now())


@shared_task(base=ReliableTask, name="lift.greet_when_ready")
def greet_when_ready(greeting_id: int) -> None:
    Greeting.objects.filter(pk=greeting_id).update(attempts=F("attempts") + 1)
    if not Greeting.objects.filter(pk=greeting_id, ready=True).exists():
        raise TransientError(f"greeting {greeting_id} is not ready")
    greet(greeting_id)
