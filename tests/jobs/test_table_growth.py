"""What a scrape or a page view reads must not grow with the tables it looks at: the
dead letters (the `dead` are never pruned), the outbox (a week of history). Each query
reads an index the size of its answer (the newest rows, the unsent backlog, the
distinct values), or, for a count, an index instead of the rows and their tracebacks.
The tables are filled as `make bench` (scenario 10) fills them, then analyzed, so the
planner chooses as it would on a real table of that size."""

import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from jobs import metrics
from jobs.admin import distinct_values
from jobs.models import DeadLetter

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/jobs/deadletter/"
TASKS = ("shop.tasks.payments.charge_payment", "shop.tasks.emails.send_receipt")


def fill_dead_letters(count: int) -> None:
    """Dead letters of two tasks, every reason and status, a traceback each (the rows are
    wide, as real ones are: reading them costs what it costs in production)."""
    execute(
        """
        INSERT INTO jobs_deadletter (task_id, task_name, args, kwargs, queue, reason,
            exception_class, exception_message, traceback, attempts, correlation_id,
            replay_of, first_failed_at, last_failed_at, status, handled_by, replay_task_id,
            replay_outcome)
        SELECT 'task-' || i, CASE WHEN mod(i, 2) = 0 THEN %(charge)s ELSE %(receipt)s END,
            jsonb_build_array(i), '{}', CASE WHEN mod(i, 2) = 0 THEN 'payments' ELSE 'emails' END,
            (ARRAY['retries_exhausted', 'permanent_error', 'time_limit', 'worker_lost',
                'poison', 'unpublishable'])[1 + mod(i, 6)],
            'shop.gateway.client.GatewayUnavailable', 'payment gateway answered 503',
            repeat(md5(i::text), 30), 13, md5(i::text), '',
            now() - interval '1 minute' * i, now() - interval '1 minute' * i,
            (ARRAY['dead', 'replayed', 'discarded'])[1 + mod(i / 6, 3)], '', '', ''
        FROM generate_series(1, %(count)s) AS i
        """,
        {"count": count, "charge": TASKS[0], "receipt": TASKS[1]},
    )
    execute("VACUUM ANALYZE jobs_deadletter")  # as autovacuum leaves a table


def fill_outbox(count: int, unsent: int) -> None:
    """Sent rows, oldest first, the newest `unsent` left unsent, one in 1,000 dead-lettered."""
    execute(
        """
        INSERT INTO jobs_outboxmessage (task_id, task_name, args, kwargs, headers,
            created_at, sent_at, attempts, failures, dead_lettered_at, last_error)
        SELECT gen_random_uuid(), %(charge)s, jsonb_build_array(i), '{}', '{}',
            now() - interval '1 second' * (%(count)s - i),
            CASE WHEN i > %(count)s - %(unsent)s OR mod(i, 1000) = 500 THEN NULL
                ELSE now() END,
            1, 0, CASE WHEN mod(i, 1000) = 500 THEN now() END, ''
        FROM generate_series(1, %(count)s) AS i
        """,
        {"count": count, "unsent": unsent, "charge": TASKS[0]},
    )
    execute("VACUUM ANALYZE jobs_outboxmessage")


def execute(sql: str, params: dict[str, Any] | None = None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def plan(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}")
        return "\n".join(row[0] for row in cursor.fetchall())


def reads_of(table: str, queries: CaptureQueriesContext) -> list[tuple[str, str]]:
    """Each captured query that reads `table`, with its plan."""
    return [
        (q["sql"], plan(q["sql"])) for q in queries.captured_queries if f'"{table}"' in q["sql"]
    ]


def rows_read(explained: str, table: str) -> bool:
    """Whether a plan reads the table's rows beyond those it returns: a sequential scan,
    or a bitmap scan (every row that matched the index, before the filter and sort)."""
    return f"Seq Scan on {table}" in explained or f"Bitmap Heap Scan on {table}" in explained


@pytest.fixture
def operator(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("ops", password="pw"))
    return client


def test_the_scrape_counts_dead_letters_from_an_index_not_the_rows():
    fill_dead_letters(20_000)

    with CaptureQueriesContext(connection) as queries:
        list(metrics._database_state(time.time()))

    [(sql, explained)] = reads_of("jobs_deadletter", queries)
    assert "GROUP BY" in sql
    assert "Index Only Scan using deadletter_state_idx" in explained, explained
    assert not rows_read(explained, "jobs_deadletter"), explained


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=dead&reason=retries_exhausted",
        "?last_failed_at__gte=2000-01-01+00:00:00%2B00:00",
    ],
)
def test_the_dead_letter_list_reads_its_page_and_counts_from_indexes(operator, query):
    fill_dead_letters(20_000)

    with CaptureQueriesContext(connection) as queries:
        response = operator.get(CHANGELIST + query)

    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 100
    reads = reads_of("jobs_deadletter", queries)
    assert reads
    for sql, explained in reads:
        assert not rows_read(explained, "jobs_deadletter"), (sql, explained)


def test_the_dead_letter_list_offers_every_task_and_queue_without_reading_every_row(operator):
    fill_dead_letters(20_000)

    with CaptureQueriesContext(connection) as queries:
        response = operator.get(CHANGELIST)

    html = response.content.decode()
    for task in TASKS:
        assert f'href="?task_name={task}"' in html
    for queue in ("emails", "payments"):
        assert f'href="?queue={queue}"' in html
    sql = [q["sql"] for q in queries.captured_queries]
    # SELECT DISTINCT reads every entry of an index; the date hierarchy the date of
    # every row (to offer its years, months, days); "(N total)" a second count.
    assert not [s for s in sql if "SELECT DISTINCT" in s]
    assert not [s for s in sql if "DATE_TRUNC" in s.upper()]
    assert len([s for s in sql if "COUNT(" in s]) == 1


def test_distinct_values_come_from_the_index_in_order():
    fill_dead_letters(20_000)
    DeadLetter.objects.create(task_id="lone", task_name="a.task", queue="", reason="poison")

    with CaptureQueriesContext(connection) as queries:
        names = distinct_values(DeadLetter, "task_name")
        queues = distinct_values(DeadLetter, "queue")

    assert names == ["a.task", *sorted(TASKS)]
    assert queues == ["", "emails", "payments"]
    for _, explained in reads_of("jobs_deadletter", queries):
        assert "Seq Scan" not in explained, explained


def test_the_operations_page_links_to_the_unsent_rows_read_from_the_relays_index(operator):
    fill_outbox(20_000, unsent=150)

    page = operator.get("/admin/operations/").content.decode()
    assert "150 unsent" in page
    assert 'href="/admin/jobs/outboxmessage/?state=unsent">Unsent rows</a>' in page
    with CaptureQueriesContext(connection) as queries:
        response = operator.get("/admin/jobs/outboxmessage/?state=unsent")

    assert response.status_code == 200
    listed = response.context["cl"]
    assert listed.result_count == 150  # the dead-lettered ones are not unsent: not listed
    assert all(row.sent_at is None and row.dead_lettered_at is None for row in listed.result_list)
    reads = reads_of("jobs_outboxmessage", queries)
    assert len(reads) == 2  # the count and the page: no count of the history, no DISTINCT
    for sql, explained in reads:
        assert "outbox_unsent_idx" in explained, (sql, explained)
        assert not rows_read(explained, "jobs_outboxmessage"), (sql, explained)
    assert "task_name=shop.tasks.payments.charge_payment" in response.content.decode()
