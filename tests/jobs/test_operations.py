"""The admin's Operations page: staff only, the queue and job state in one view."""

import uuid

import pytest
from django.contrib.auth.models import User

from jobs import outbox
from jobs.models import DeadLetter

pytestmark = pytest.mark.django_db(transaction=True)


def test_only_staff_see_the_operations_page(client):
    User.objects.create_user("shopper", password="pw")
    client.login(username="shopper", password="pw")

    response = client.get("/admin/operations/")

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_operations_page_shows_queues_dead_letters_outbox_and_findings(client, broker):
    outbox.enqueue("shop.tasks.payments.charge_payment", args=[1])
    outbox.flush_marks()  # published: marked sent now, not half a second later
    DeadLetter.objects.create(task_id=str(uuid.uuid4()), task_name="t", reason="poison")
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))

    index = client.get("/admin/")
    response = client.get("/admin/operations/")

    assert b'href="/admin/operations/"' in index.content
    assert response.status_code == 200
    snapshot = response.context["snapshot"]
    payments = next(q for q in snapshot.queues if q.name == "payments")
    assert (payments.depth, payments.consumers) == (1, 0)
    assert [q.name for q in snapshot.queues] == ["default", "emails", "payments", "reports"]
    assert snapshot.dead_letters == {"poison": {"dead": 1}}
    html = response.content.decode()
    assert "/admin/jobs/deadletter/?reason=poison&amp;status=dead" in html
    assert "0 unsent" in html
    assert "Not run yet" in html
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "never" in html  # no canary has run on any queue


def test_operations_page_says_what_it_could_not_read_with_the_broker_down(client, broker):
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    broker.stop()
    try:
        response = client.get("/admin/operations/")
    finally:
        broker.start()

    assert response.status_code == 200
    assert b"Could not read: queues, unacked, consumers, canaries" in response.content
