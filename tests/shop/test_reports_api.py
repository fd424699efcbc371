"""POST /api/reports/sales/ scans the whole order history: staff only, one at a time.

The "one at a time" is a row in the database (ReportRun), so it holds across web
processes, beat and replays; a run that died without a word stops blocking after the
task's hard time limit."""

import os
import re
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.errors import PermanentError
from jobs.testing import assert_enqueued, assert_nothing_enqueued, enqueued
from shop.models import Order, OrderLine, Product, ReportRun
from shop.services import reports
from shop.services.reports import ABANDON_AFTER, sales_report_run
from shop.tasks.reports import build_sales_report

URL = "/api/reports/sales/"
pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    return client


@pytest.fixture(autouse=True)
def _quick_reports(settings, tmp_path):
    settings.REPORTS_DIR = tmp_path / "reports"
    settings.REPORT_CHUNK_DELAY = 0


def test_an_anonymous_request_is_refused_and_enqueues_nothing(client):
    response = client.post(URL)

    assert response.status_code == 403
    assert "staff" in response.json()["errors"]["auth"][0]
    assert_nothing_enqueued()
    assert ReportRun.objects.count() == 0


def test_a_logged_in_shopper_who_is_not_staff_is_refused(client):
    client.force_login(User.objects.create_user("ada", password="pw"))

    response = client.post(URL)

    assert response.status_code == 403
    assert_nothing_enqueued()


def test_staff_queue_a_report_through_the_outbox(staff):
    response = staff.post(URL)

    assert response.status_code == 202
    task_id = response.json()["task_id"]
    [message] = assert_enqueued("shop.tasks.reports.build_sales_report")
    assert len(enqueued()) == 1
    assert str(message.task_id) == task_id
    assert ReportRun.objects.get().status == ReportRun.Status.QUEUED


def test_a_second_request_while_one_is_queued_is_409_and_names_the_first(staff):
    first = staff.post(URL).json()["task_id"]

    second = staff.post(URL)

    assert second.status_code == 409
    errors = second.json()["errors"]
    assert errors["task_id"] == [first]
    assert "already" in errors["report"][0]
    assert len(enqueued()) == 1
    assert ReportRun.objects.count() == 1


def _order(products, status, *items):
    order = Order.objects.create(email="a@example.com", total=0, status=status)
    for sku, quantity in items:
        product = products[sku]
        OrderLine.objects.create(
            order=order, product=product, quantity=quantity, unit_price=product.price
        )
    return order


def test_the_report_sums_the_paid_orders_page_by_page(products, monkeypatch):
    """Units and revenue per product over the paid orders, in sku order, read a window of
    order ids at a time: no query joins, and none reads more than a window of ids (one
    query over the whole history has PostgreSQL compute and hold all of it at the
    report's start; "the next page of paid orders" read, without statistics, every order
    after the page's start)."""
    monkeypatch.setattr(reports, "CHUNK", 3)
    products["BAG"] = Product.objects.create(sku="BAG", name="Wool bag", price=30, stock=10)
    products["CAP"] = Product.objects.create(sku="CAP", name="Cap", price=9, stock=10)
    paid, pending, failed = Order.Status.PAID, Order.Status.PENDING, Order.Status.FAILED
    for status in [paid, pending, paid, failed, paid, paid, paid]:
        unpaid_only = [("CAP", 1)] if status != paid else []
        _order(products, status, ("MUG", 1), ("TEE", 2), *unpaid_only)
    _order(products, paid, ("BAG", 1))

    with CaptureQueriesContext(connection) as queries:
        path = reports.sales_report_build()

    assert path.read_text().splitlines() == [
        "sku,name,units,revenue",
        "BAG,Wool bag,1,30.00",
        "MUG,Mug,5,62.50",
        "TEE,Tee,10,200.00",
    ]
    sql = [q["sql"] for q in queries]
    assert not [q for q in sql if "JOIN" in q]
    windows = []
    for query in (q for q in sql if 'FROM "shop_order' in q):
        window = re.search(r"BETWEEN (\d+) AND (\d+)", query)
        if window:
            windows.append(int(window[2]) - int(window[1]) + 1)
        else:  # the last order's id, or the next order's: an index's first entry
            assert "MAX(" in query or query.endswith("LIMIT 1"), query
    assert windows == [3, 3, 3, 3, 2, 2]  # 8 orders: their ids, then their lines


def test_a_gap_in_the_order_ids_costs_no_empty_windows(products, monkeypatch):
    """A window starts at the next order that exists: ids deleted (or skipped by the
    sequence) in between are not read window by empty window."""
    monkeypatch.setattr(reports, "CHUNK", 2)
    _order(products, Order.Status.PAID, ("MUG", 1))
    gone = [_order(products, Order.Status.PENDING, ("MUG", 1)).pk for _ in range(20)]
    Order.objects.filter(pk__in=gone).delete()
    _order(products, Order.Status.PAID, ("TEE", 1))

    with CaptureQueriesContext(connection) as queries:
        path = reports.sales_report_build()

    assert path.read_text().splitlines()[1:] == ["MUG,Mug,1,12.50", "TEE,Tee,1,20.00"]
    assert (
        len([q for q in queries if 'FROM "shop_order" WHERE' in q["sql"] and "BETWEEN" in q["sql"]])
        == 2
    )


def test_a_report_stops_at_the_orders_placed_before_it_started(products, monkeypatch):
    """A shop keeps taking orders while its report runs: the report reads up to its start
    and ends, instead of chasing every order paid since."""
    monkeypatch.setattr(reports, "CHUNK", 2)
    for _ in range(3):
        _order(products, Order.Status.PAID, ("MUG", 2))
    pages = []

    def a_new_order_per_page(seconds: float) -> None:
        pages.append(seconds)
        assert len(pages) < 10, "the report is still reading orders placed after it started"
        _order(products, Order.Status.PAID, ("MUG", 2))

    monkeypatch.setattr(reports.time, "sleep", a_new_order_per_page)
    path = reports.sales_report_build()

    assert path.read_text().splitlines()[1:] == ["MUG,Mug,6,75.00"]
    assert len(pages) == 2


def test_an_order_paid_while_the_report_runs_is_counted_whole_or_not_at_all(products, monkeypatch):
    """Its lines are read together: an order paid between two reads is never counted in
    part (its later lines only)."""
    monkeypatch.setattr(reports, "CHUNK", 1)
    _order(products, Order.Status.PAID, ("MUG", 1))
    late = _order(products, Order.Status.PENDING, ("MUG", 1), ("TEE", 1))
    reads = []

    def paid_on_the_second_read(seconds: float) -> None:
        reads.append(seconds)
        if len(reads) == 2:
            Order.objects.filter(pk=late.pk).update(status=Order.Status.PAID)

    monkeypatch.setattr(reports.time, "sleep", paid_on_the_second_read)
    rows = reports.sales_report_build().read_text().splitlines()[1:]

    assert rows in (["MUG,Mug,1,12.50"], ["MUG,Mug,2,25.00", "TEE,Tee,1,20.00"])


def test_a_running_report_blocks_too_and_a_finished_one_does_not(staff):
    first = staff.post(URL).json()["task_id"]
    ReportRun.objects.update(status=ReportRun.Status.RUNNING, started_at=timezone.now())
    assert staff.post(URL).status_code == 409

    ReportRun.objects.update(status=ReportRun.Status.QUEUED, started_at=None)
    path = sales_report_run(task_id=first)
    after = staff.post(URL)

    assert path is not None
    assert path.read_text().splitlines()[0] == "sku,name,units,revenue"
    assert ReportRun.objects.get(task_id=first).status == ReportRun.Status.DONE
    assert ReportRun.objects.get(task_id=first).finished_at is not None
    assert after.status_code == 202
    assert after.json()["task_id"] != first
    assert len(enqueued()) == 2


@pytest.mark.parametrize("status", [ReportRun.Status.QUEUED, ReportRun.Status.RUNNING])
def test_a_run_older_than_the_time_limit_is_abandoned_and_does_not_block(staff, status):
    stale = timezone.now() - ABANDON_AFTER - timedelta(seconds=1)
    old = ReportRun.objects.create(task_id="died-long-ago", status=status)
    started = stale if status == ReportRun.Status.RUNNING else None
    ReportRun.objects.filter(pk=old.pk).update(created_at=stale, started_at=started)

    response = staff.post(URL)

    assert response.status_code == 202
    old.refresh_from_db()
    assert old.status == ReportRun.Status.FAILED
    assert old.finished_at is not None
    # and when its message is delivered after all, it builds nothing: another one runs
    assert sales_report_run(task_id="died-long-ago") is None


def test_a_queued_run_given_up_is_built_when_its_message_arrives_and_nothing_else_runs(
    staff, monkeypatch
):
    from shop.services import reports

    monkeypatch.setattr(reports, "sales_report_build", lambda: Path("report.csv"))
    stale = timezone.now() - ABANDON_AFTER - timedelta(seconds=1)
    waited = ReportRun.objects.create(task_id="waited-long", status=ReportRun.Status.QUEUED)
    ReportRun.objects.filter(pk=waited.pk).update(created_at=stale)
    sales_report_run(task_id="beat-1")  # beat's run gives the waiting one up, then runs

    built = sales_report_run(task_id="waited-long")

    assert built == Path("report.csv")
    assert ReportRun.objects.get(pk=waited.pk).status == ReportRun.Status.DONE


def test_a_run_just_inside_the_time_limit_still_blocks(staff):
    first = staff.post(URL).json()["task_id"]
    recent = timezone.now() - ABANDON_AFTER + timedelta(seconds=30)
    ReportRun.objects.update(status=ReportRun.Status.RUNNING, started_at=recent)

    response = staff.post(URL)

    assert response.status_code == 409
    assert response.json()["errors"]["task_id"] == [first]


def test_the_scheduled_run_skips_quietly_while_a_requested_one_is_queued(staff):
    requested = staff.post(URL).json()["task_id"]

    assert sales_report_run(task_id="beat-1") is None

    assert list(ReportRun.objects.values_list("task_id", "status")) == [
        (requested, ReportRun.Status.QUEUED)
    ]


def test_the_scheduled_run_claims_a_run_of_its_own_and_blocks_requests(
    staff, monkeypatch, tmp_path
):
    ReportRun.objects.create(task_id="earlier", status=ReportRun.Status.DONE)
    during = []

    def build():
        during.append(staff.post(URL).status_code)  # a request while beat's run works
        return tmp_path / "sales.csv"

    monkeypatch.setattr(reports, "sales_report_build", build)
    path = sales_report_run(task_id="beat-2")

    assert path == tmp_path / "sales.csv"
    assert during == [409]
    assert ReportRun.objects.get(task_id="beat-2").status == ReportRun.Status.DONE
    assert_nothing_enqueued()


def test_the_database_refuses_a_second_active_run():
    ReportRun.objects.create(task_id="a", status=ReportRun.Status.QUEUED)

    with pytest.raises(IntegrityError), transaction.atomic():
        ReportRun.objects.create(task_id="b", status=ReportRun.Status.RUNNING)


def test_a_staff_session_needs_the_csrf_token_so_another_site_cannot_post_it():
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(User.objects.create_user("ops", password="pw", is_staff=True))

    forged = browser.post(URL)  # what a form on another site makes the browser send
    browser.get("/admin/")  # any page of the shop sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    genuine = browser.post(URL, HTTP_X_CSRFTOKEN=token)

    assert forged.status_code == 403
    assert "CSRF" in forged.json()["errors"]["csrf"][0]
    assert genuine.status_code == 202
    assert len(enqueued()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_report_that_fails_for_good_marks_its_run_failed(staff, monkeypatch, broker):
    task_id = staff.post(URL).json()["task_id"]

    def broken() -> None:
        raise PermanentError("the disk is full")

    monkeypatch.setattr(reports, "sales_report_build", broken)
    build_sales_report.apply(task_id=task_id)

    run = ReportRun.objects.get(task_id=task_id)
    assert run.status == ReportRun.Status.FAILED
    assert staff.post(URL).status_code == 202


@pytest.mark.django_db(transaction=True)
def test_two_requests_at_the_same_instant_queue_one_report(broker, monkeypatch):
    """Both pass the "is one active?" read; the partial unique index lets one insert."""
    User.objects.create_user("ops", password="pw", is_staff=True)
    both_checked = threading.Barrier(2, timeout=10)
    real_enqueue = reports.enqueue

    def enqueue_after_both_checked(task):
        both_checked.wait()
        return real_enqueue(task)

    monkeypatch.setattr(reports, "enqueue", enqueue_after_both_checked)
    statuses: list[int] = []

    def request() -> None:
        try:
            browser = Client()
            browser.login(username="ops", password="pw")
            statuses.append(browser.post(URL).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(statuses) == [202, 409]
    assert len(enqueued()) == 1
    assert ReportRun.objects.count() == 1


def test_a_built_report_deletes_reports_and_finished_runs_past_their_retention(settings):
    settings.REPORT_RETENTION_DAYS = 30
    now = timezone.now()
    expired, recent = now - timedelta(days=31), now - timedelta(days=29)
    settings.REPORTS_DIR.mkdir(parents=True)

    def report(name: str, modified: datetime) -> None:
        path = settings.REPORTS_DIR / name
        path.write_text("sku,name,units,revenue\n")
        os.utime(path, (modified.timestamp(), modified.timestamp()))

    report("sales-expired.csv", expired)
    report("sales-recent.csv", recent)
    report("sales-killed.csv.part", now - ABANDON_AFTER - timedelta(seconds=1))
    report("sales-being-written.csv.part", now)
    for task_id, status, finished in [
        ("done-expired", ReportRun.Status.DONE, expired),
        ("failed-expired", ReportRun.Status.FAILED, expired),
        ("done-recent", ReportRun.Status.DONE, recent),
    ]:
        ReportRun.objects.create(task_id=task_id, status=status, finished_at=finished)

    built = sales_report_run(task_id="beat-9")

    assert built is not None
    assert sorted(path.name for path in settings.REPORTS_DIR.iterdir()) == sorted(
        [built.name, "sales-recent.csv", "sales-being-written.csv.part"]
    )
    assert set(ReportRun.objects.values_list("task_id", flat=True)) == {"done-recent", "beat-9"}
