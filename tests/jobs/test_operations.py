"""The admin's Operations page: staff only, the queue and job state in one view."""

import uuid

import pytest
from django.contrib.auth.models import User

from jobs import outbox
from jobs.dependencies import Dependency
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
    assert outbox.wait_published()
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
    with broker.down():
        response = client.get("/admin/operations/")

    assert response.status_code == 200
    assert b"Could not read: queues, unacked, consumers, canaries, dependencies" in response.content


def test_operations_page_shows_each_dependencys_breaker_and_rate_limit(client, broker, settings):
    settings.JOBS_DEPENDENCIES = {
        "gateway": {"rate": 50.0, "failures": 2},
        "mail": {},
    }
    for _ in range(2):
        Dependency("gateway").failed()
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))

    response = client.get("/admin/operations/")

    rows = {row.name: row for row in response.context["snapshot"].dependencies}
    assert (rows["gateway"].breaker, rows["gateway"].rate_limit) == ("open", 50.0)
    assert (rows["mail"].breaker, rows["mail"].rate_limit) == ("closed", 0)
    html = response.content.decode()
    assert "open: calls are deferred" in html
    assert "50 calls/s" in html


def test_operations_page_links_to_flower_and_to_prometheus_when_it_runs(client, broker, settings):
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    settings.JOBS_FLOWER_URL = "http://127.0.0.1:5555/"
    settings.JOBS_PROMETHEUS_URL = ""
    without = client.get("/admin/operations/").content.decode()
    settings.JOBS_PROMETHEUS_URL = "http://127.0.0.1:9090/classic/alerts"

    html = client.get("/admin/operations/").content.decode()

    assert '<a href="http://127.0.0.1:5555/">Flower</a>' in html
    assert '<a href="http://127.0.0.1:9090/classic/alerts">Prometheus</a>' in html
    assert "Prometheus" not in without
