"""A queue whose worker stops consuming shows it: its canary goes stale and its oldest
waiting message ages; a worker taking the queue again recovers both."""

import time

import pytest

from jobs import app
from jobs.canary import canary_send
from tests.helpers import scrape, value, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def canary_age(client, queue: str) -> float:
    return value(scrape(client), "jobs_canary_age_seconds", queue=queue)


def test_a_stopped_emails_worker_shows_as_a_stale_canary_and_an_aging_queue(
    client, broker, start_worker
):
    worker = start_worker("emails")
    canary_send()
    wait_until(lambda: canary_age(client, "emails") < 5, timeout=20, what="the first canary")

    # when: the worker stops consuming while work keeps arriving
    worker.stop()
    canary_send()
    app.send_task("shop.tasks.emails.send_receipt", args=[1])
    time.sleep(1.5)
    stale = scrape(client)

    # then: the canary is older than the pause and the queue's oldest message ages
    assert value(stale, "jobs_canary_age_seconds", queue="emails") >= 1.5
    assert value(stale, "jobs_queue_depth", queue="emails") == 2
    assert value(stale, "jobs_queue_oldest_age_seconds", queue="emails") >= 1.5
    assert value(stale, "jobs_canary_age_seconds", queue="reports") == float("inf")

    # when: a worker takes the queue again
    start_worker("emails")

    # then: the waiting canary runs, the queue drains
    wait_until(lambda: canary_age(client, "emails") < 5, timeout=30, what="recovery")
    wait_until(
        lambda: value(scrape(client), "jobs_queue_depth", queue="emails") == 0,
        timeout=30,
        what="the queue to drain",
    )
