"""Steps of the lift test, run in a process of the lift project's own
(``python -m tests.liftproject.drive STEP``): each prints one JSON object of what it saw,
and tests/test_lift.py asserts on it."""

import json
import sys

import django

django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.db import transaction  # noqa: E402
from django.test import Client  # noqa: E402

from jobs.models import DeadLetter, OutboxMessage  # noqa: E402
from jobs.outbox import enqueue  # noqa: E402
from tests.liftproject.models import Greeting  # noqa: E402
from tests.liftproject.tasks import greet, greet_when_ready  # noqa: E402


def enqueue_two() -> dict[str, object]:
    with transaction.atomic():
        ada = Greeting.objects.create(name="ada")
        bob = Greeting.objects.create(name="bob", ready=False)
        enqueue(greet, args=[ada.pk])
        enqueue(greet_when_ready, args=[bob.pk])
    return {"ada": ada.pk, "bob": bob.pk}


def state() -> dict[str, object]:
    return {
        "greetings": {
            g.name: {"greeted": g.greeted_at is not None, "attempts": g.attempts}
            for g in Greeting.objects.all()
        },
        "dead_letters": [
            {"id": d.pk, "task": d.task_name, "reason": d.reason, "status": d.status}
            for d in DeadLetter.objects.order_by("pk")
        ],
        "outbox_unsent": OutboxMessage.objects.filter(sent_at=None).count(),
    }


def fix_and_replay() -> dict[str, object]:
    Greeting.objects.filter(name="bob").update(ready=True)
    User.objects.create_superuser("operator", "op@example.com", "pw")
    client = Client()
    client.force_login(User.objects.get(username="operator"))
    ids = list(DeadLetter.objects.filter(status="dead").values_list("pk", flat=True))
    response = client.post(
        "/admin/jobs/deadletter/",
        {"action": "replay_selected", "_selected_action": ids},
        follow=True,
    )
    index = client.get("/admin/")
    return {
        "status": response.status_code,
        "replayed_message": b"1 dead letter replayed." in response.content,
        "index": index.status_code,
        "operations_linked": b"/admin/operations/" in index.content,
        "operations": client.get("/admin/operations/").status_code,
    }


def probes() -> dict[str, object]:
    from django.core.checks import run_checks

    from jobs.celery import app

    client = Client(HTTP_HOST="10.1.2.3:8000")  # a pod's IP, as kubelet and Prometheus ask
    metrics = client.get("/metrics")
    return {
        "admin_by_ip": client.get("/admin/login/").status_code,  # host validation holds
        "checks": sorted(str(message.id) for message in run_checks()),
        "transport": app.conf.broker_transport_options,
        "readyz": client.get("/readyz").status_code,
        "healthz": client.get("/healthz").status_code,
        "metrics": metrics.status_code,
        # The workers' counts too: every process writes to PROMETHEUS_MULTIPROC_DIR.
        "succeeded": sorted(
            line
            for line in metrics.content.decode().splitlines()
            if line.startswith("jobs_tasks_succeeded_total{") and "lift." in line
        ),
        "beat_schedule": sorted(app.conf.beat_schedule),
        "acks_late": app.conf.task_acks_late,
        "shop_imported": any(name == "shop" or name.startswith("shop.") for name in sys.modules),
    }


if __name__ == "__main__":
    steps = {"enqueue": enqueue_two, "state": state, "replay": fix_and_replay, "probes": probes}
    print(json.dumps(steps[sys.argv[1]]()))
