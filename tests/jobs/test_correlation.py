"""The correlation id starts at the HTTP request and is written into the jobs it causes;
log records carry it, as text or as JSON."""

import json
import logging

import pytest

from jobs import correlation, outbox
from jobs.logs import CorrelationFilter, JsonFormatter, job_event
from jobs.models import OutboxMessage

ORDER = {
    "email": "ada@example.com",
    "card_token": "tok_visa",
    "items": [{"sku": "MUG", "quantity": 1}],
}


@pytest.mark.django_db(transaction=True)
def test_a_client_request_id_is_echoed_and_written_into_the_outbox_row(client, broker, products):
    response = client.post(
        "/api/orders/", ORDER, content_type="application/json", headers={"X-Request-ID": "req-42"}
    )

    assert response.status_code == 201
    assert response["X-Request-ID"] == "req-42"
    assert OutboxMessage.objects.get().headers == {"x_correlation_id": "req-42"}


@pytest.mark.django_db(transaction=True)
def test_the_publish_after_commit_logs_under_the_requests_correlation_id(
    client, broker, products, monkeypatch
):
    logged: list[str] = []
    real_sent = outbox._sent

    def sent(message: OutboxMessage) -> None:
        logged.append(correlation.get())
        real_sent(message)

    monkeypatch.setattr(outbox, "_sent", sent)

    client.post(
        "/api/orders/", ORDER, content_type="application/json", headers={"X-Request-ID": "req-43"}
    )
    assert outbox.wait_published()

    # then: the publishing thread's "published" line carries the request's id, though it
    # ran after the request had answered, in a thread of its own
    assert logged == ["req-43"]


@pytest.mark.parametrize("sent", [None, "", "has spaces", "x" * 200, "<script>"])
def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(client, sent):
    headers = {"X-Request-ID": sent} if sent is not None else {}

    response = client.get("/healthz", headers=headers)

    assert response["X-Request-ID"] != sent
    assert len(response["X-Request-ID"]) == 32


def test_log_records_carry_the_correlation_id_as_json():
    record = logging.LogRecord("jobs.events", logging.INFO, __file__, 1, "%s", ("x",), None)
    record.__dict__.update(event="started", task_id="t-1", attempt=2)
    token = correlation.activate("req-7")
    try:
        CorrelationFilter().filter(record)
    finally:
        correlation.deactivate(token)

    line = json.loads(JsonFormatter().format(record))

    assert line["correlation_id"] == "req-7"
    assert (line["event"], line["task_id"], line["attempt"]) == ("started", "t-1", 2)
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "jobs.events", "x")


def test_job_event_puts_the_fields_on_the_record(caplog):
    with caplog.at_level(logging.INFO, logger="jobs.events"):
        job_event("published", task_id="t-9", task_name="a.b")

    [record] = caplog.records
    assert (record.event, record.task_id, record.task_name) == ("published", "t-9", "a.b")
    assert record.getMessage() == "published task_id=t-9 task_name=a.b"
