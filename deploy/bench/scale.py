"""Scenario 10: what the same work costs as the tables grow.

At each size (three, 10x apart) the tables are emptied and filled anew with plain SQL
(`INSERT ... SELECT ... FROM generate_series`), then vacuumed and analyzed as autovacuum
would have them, and the same fixed work is measured on them:

- the relay publishing a backlog of unsent rows (rows/s), from an outbox of that size;
- one `/metrics` scrape, through the bench's gunicorn;
- the dead-letter admin list (as it opens, and filtered as the Operations page links
  to it) and the Operations page, through gunicorn, as a staff user logged in through
  the admin's login form;
- the reconciler's run (every check, repairs included, as beat runs it);
- `dlq replay` of a fixed number of dead letters (rows/s), the batch pause set to 0 so
  that the work is measured, not the throttle.

What is filled is what a shop in steady state holds: an outbox of mostly sent rows
spread over its retention (7 days), a backlog left by a broker outage, a few rows
dead-lettered; dead letters of every task, reason and status, `dead` ones from months
back (they are never pruned), handled ones from the last 30 days (their retention);
orders with their payment, receipt and a charge in the gateway's ledger, paid, failed or
cancelled, a few in flight, and a fixed number of gaps for the reconciler to find and
repair (paid orders without a sent receipt, payments stuck pending).

The consumers of `default` (beat's relay), `payments` and `emails` are paused for the
scenario, and those queues purged after each size: what the relay, the reconciler and
the replay publish is never charged or mailed, and the backlog waits for the relay that
is measured. The tables are emptied again at the end, so the scenarios after this one
run on the tables they always did.
"""

import argparse
import io
import re
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from deploy.bench.rig import Bench
from deploy.bench.scenarios import Figures, Goal, Result

NUMBER = 10
CHARGE = "shop.tasks.payments.charge_payment"
RECEIPT = "shop.tasks.emails.send_receipt"
REPORT = "shop.tasks.reports.build_sales_report"
PAUSED = ("default", "payments", "emails")
TABLES = ["jobs_outboxmessage", "jobs_deadletter", "shop_order", "shop_orderline"]
TABLES += ["shop_payment", "shop_receipt"]
STAFF_USER = "bench-ops"

# Each measure of this scenario (figures are named <measure>_<rows>): what it is, and
# the table whose size <rows> is. report.py draws scale.png from these.
MEASURES: dict[str, tuple[str, str]] = {
    "relay_rows_per_s": ("relay: rows published per second", "outbox rows"),
    "metrics_ms": ("/metrics scrape (ms)", "outbox rows"),
    "operations_ms": ("Operations page (ms)", "outbox rows"),
    "outbox_unsent_ms": ("its link: the unsent outbox rows (ms)", "outbox rows"),
    "admin_list_ms": ("dead-letter admin list (ms)", "dead letters"),
    "admin_dead_ms": ("dead-letter list, dead of one reason (ms)", "dead letters"),
    "replay_rows_per_s": ("dlq replay: rows per second", "dead letters"),
    "reconcile_ms": ("reconciler run, every check (ms)", "orders"),
    "ledger_check_ms": ("ledger_mismatch check alone (ms)", "orders"),
}


def scale(bench: Bench, args: argparse.Namespace) -> Result:
    """The scale curves: each measure at three table sizes."""
    quick = bool(getattr(args, "quick", False))
    outbox_sizes = tuple(
        getattr(
            args, "scale_outbox", (1_000, 2_000, 4_000) if quick else (10_000, 100_000, 1_000_000)
        )
    )
    letter_sizes = tuple(
        getattr(args, "scale_dead_letters", (100, 200, 400) if quick else (1_000, 10_000, 100_000))
    )
    order_sizes = tuple(getattr(args, "scale_orders", tuple(n // 2 for n in outbox_sizes)))
    backlog = int(getattr(args, "scale_backlog", min(2_000, outbox_sizes[0] // 5)))
    replayed = int(getattr(args, "scale_replay", 100 if quick else 10_000))
    gaps = int(getattr(args, "scale_gaps", 20))
    requests = int(getattr(args, "scale_requests", 3 if quick else 9))
    runs = int(getattr(args, "scale_reconciles", 1 if quick else 3))
    if not len(outbox_sizes) == len(letter_sizes) == len(order_sizes) >= 2:
        raise SystemExit("bench: the scale sizes need as many outbox, dead-letter and order sizes")

    first, last = outbox_sizes[0], outbox_sizes[-1]
    first_letters, last_letters = letter_sizes[0], letter_sizes[-1]
    last_orders = order_sizes[-1]
    limit = _reconcile_time_limit()
    result = Result(
        NUMBER,
        "Cost as tables grow",
        [
            Goal(f"metrics_ms_{last}", "<=", 250),
            Goal(f"operations_ms_{last}", "<=", 500),
            Goal(f"outbox_unsent_ms_{last}", "<=", 500),
            Goal(f"admin_list_ms_{last_letters}", "<=", 500),
            Goal(f"admin_dead_ms_{last_letters}", "<=", 500),
            Goal("relay_flatness", ">=", 0.5),
            Goal("replay_flatness", ">=", 0.5),
            # Beat's reconcile task is cut off at its soft time limit: at the largest size
            # a run must take half of it at most, the other half for a slower day.
            Goal(f"reconcile_ms_{last_orders}", "<=", limit * 1000 / 2),
        ],
    )
    bench.pause(*PAUSED)
    figures: Figures = {}
    fills: list[str] = []
    staff = _staff_client(bench)
    try:
        for outbox_rows, letters, orders in zip(
            outbox_sizes, letter_sizes, order_sizes, strict=True
        ):
            started = time.monotonic()
            _fill(bench, outbox_rows, backlog, letters, orders, gaps)
            fills.append(f"{time.monotonic() - started:.0f} s")
            figures[f"relay_rows_per_s_{outbox_rows}"] = _relay(backlog)
            bench.purge(*PAUSED)
            figures[f"metrics_ms_{outbox_rows}"] = _median_ms(staff, "/metrics", requests)
            figures[f"operations_ms_{outbox_rows}"] = _median_ms(
                staff, "/admin/operations/", requests
            )
            figures[f"outbox_unsent_ms_{outbox_rows}"] = _median_ms(
                staff, _unsent_link(staff), requests
            )
            figures[f"admin_list_ms_{letters}"] = _median_ms(
                staff, "/admin/jobs/deadletter/", requests
            )
            figures[f"admin_dead_ms_{letters}"] = _median_ms(
                staff, "/admin/jobs/deadletter/?reason=retries_exhausted&status=dead", requests
            )
            total, ledger = _reconcile(runs)
            figures[f"reconcile_ms_{orders}"] = total
            figures[f"ledger_check_ms_{orders}"] = ledger
            bench.purge(*PAUSED)
            figures[f"replay_rows_per_s_{letters}"] = _replay(replayed)
            bench.purge(*PAUSED)
    finally:
        staff.close()
        _empty(bench)
        bench.purge(*PAUSED)
        bench.resume(*PAUSED)
    figures["relay_flatness"] = (
        figures[f"relay_rows_per_s_{last}"] / figures[f"relay_rows_per_s_{first}"]
    )
    figures["replay_flatness"] = (
        figures[f"replay_rows_per_s_{last_letters}"] / figures[f"replay_rows_per_s_{first_letters}"]
    )
    result.reps.append(figures)
    steps = "; ".join(
        f"{n:,} outbox rows ({backlog:,} unsent), {m:,} dead letters, {k:,} orders"
        for n, m, k in zip(outbox_sizes, letter_sizes, order_sizes, strict=True)
    )
    result.notes += [
        f"sizes: {steps}; filled in {', '.join(fills)}",
        f"relay: {backlog:,} unsent rows published per size; replay: {replayed:,} dead "
        f"letters of one incident added to the table, REPLAY_BATCH_PAUSE 0; pages and "
        f"scrapes: median of {requests} requests after a warm-up; reconciler: median of "
        f"{runs} runs, {gaps} gaps of each kind to repair",
        "one fill per size, so one repetition: min and max are the median",
        "flatness: the largest size's rows/s over the smallest's. The relay and the replay "
        "read and write their rows by index (the relay's partial index of unsent rows, "
        f"primary keys), so the same work on a table {last // first}x larger must cost "
        "about the same: at least half the rate, for a B-tree one level deeper and a "
        "shared machine's noise",
        f"reconciler: at most half its task's soft time limit ({limit:g} s); its ledger "
        "check compares the gateway's whole ledger with every paid order, so it grows "
        "with the orders by design",
    ]
    return result


# --- filling -------------------------------------------------------------------------


def _execute(sql: str, params: dict[str, Any] | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _empty(bench: Bench) -> None:
    _execute(f"TRUNCATE {', '.join(TABLES)}")
    with sqlite3.connect(bench.dir / "gateway.sqlite3", timeout=30) as ledger:
        ledger.execute("DELETE FROM charges")
    ledger.close()


def _fill(
    bench: Bench, outbox_rows: int, backlog: int, letters: int, orders: int, gaps: int
) -> None:
    """Empty the tables and fill them for one size: the jobs' tables and the shop's (with
    the gateway's ledger) side by side, each on a connection of its own."""
    _empty(bench)
    names = {"charge": CHARGE, "receipt": RECEIPT, "report": REPORT}

    def jobs_side() -> None:
        _execute("SELECT setseed(0.25)")  # the same mix in every run
        _execute(_OUTBOX, {"n": outbox_rows, "backlog": backlog, **names})
        _execute(_DEAD_LETTERS, {"m": letters, **names})
        _vacuum("jobs_outboxmessage", "jobs_deadletter")

    def shop_side() -> None:
        _execute("SELECT setseed(0.5)")
        _execute(_ORDERS, {"k": orders})
        _execute(_PAYMENTS)
        _execute(_RECEIPTS)
        for statement in _GAPS:
            _execute(statement, {"gaps": gaps})
        _fill_ledger(bench)
        _vacuum("shop_order", "shop_orderline", "shop_payment", "shop_receipt")

    _side_by_side(jobs_side, shop_side)


def _vacuum(*tables: str) -> None:
    for table in tables:  # as autovacuum leaves them: visibility map set, statistics fresh
        _execute(f"VACUUM ANALYZE {table}")


def _side_by_side(*functions: Callable[[], None]) -> None:
    """Run each function in a thread of its own (a database connection each)."""
    from django.db import connections

    errors: list[BaseException] = []

    def run(function: Callable[[], None]) -> None:
        try:
            function()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(f,)) for f in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# Sent rows spread over the retention (7 days, oldest first, as ids grow), then the
# backlog: the newest rows, left unsent by a broker outage of the last 10 minutes (one
# failed attempt each). One row in 10,000 was dead-lettered (unpublishable).
_OUTBOX = """
INSERT INTO jobs_outboxmessage (task_id, task_name, args, kwargs, headers, created_at,
    sent_at, attempts, failures, retry_after, dead_lettered_at, last_error)
SELECT gen_random_uuid(),
    CASE WHEN unsent THEN %(charge)s WHEN mod(i, 1000) = 999 THEN %(report)s
        WHEN mod(i, 2) = 0 THEN %(charge)s ELSE %(receipt)s END,
    CASE WHEN NOT unsent AND mod(i, 1000) = 999 THEN '[]'::jsonb
        ELSE jsonb_build_array(i / 2 + 1) END,
    '{}'::jsonb,
    jsonb_build_object('x_correlation_id', md5(i::text)),
    created,
    CASE WHEN unsent OR lettered THEN NULL ELSE created + interval '4 milliseconds' END,
    CASE WHEN lettered THEN 8 ELSE 1 END,
    CASE WHEN lettered THEN 8 ELSE 0 END,
    NULL,
    CASE WHEN lettered THEN created + interval '20 minutes' END,
    CASE WHEN lettered THEN 'QueueNotFound(''old'')'
        WHEN unsent THEN 'OperationalError(''Error 111 connecting to redis:6379.'')'
        ELSE '' END
FROM (
    SELECT i, unsent, NOT unsent AND mod(i, 10000) = 5000 AS lettered,
        CASE WHEN unsent
            THEN now() - interval '10 minutes'
                + interval '9 minutes' * ((i - (%(n)s - %(backlog)s))::float / %(backlog)s)
            ELSE now() - interval '7 days'
                + (interval '7 days' - interval '1 hour') * (i::float / %(n)s) END AS created
    FROM (SELECT i, i > %(n)s - %(backlog)s AS unsent FROM generate_series(1, %(n)s) AS i) AS s
) AS rows
"""

# Tasks: charges 55 %, receipts 35 %, reports 10 %; reasons from the common (retries
# exhausted) to the rare (unpublishable, no queue); `dead` 30 % over the last 180 days
# (never pruned), replayed 55 % and discarded 15 % over the last 30 days (retention).
# All at least 2 hours old: the replay's incident comes later.
_DEAD_LETTERS = """
INSERT INTO jobs_deadletter (task_id, task_name, args, kwargs, queue, reason,
    exception_class, exception_message, traceback, attempts, correlation_id, replay_of,
    first_failed_at, last_failed_at, status, handled_by, handled_at, replay_task_id,
    replay_outcome)
SELECT gen_random_uuid()::text, task, jsonb_build_array(i), '{}'::jsonb,
    CASE WHEN reason = 'unpublishable' THEN '' ELSE queue END,
    reason, exception_class, exception_message,
    'Traceback (most recent call last):'
        || repeat(E'\\n  File "/app/jobs/base.py", line 97, in __call__\\n'
            || E'    return super().__call__(*args, **kwargs)', 6)
        || E'\\n  File "/app/shop/services/payments.py", line ' || mod(i, 300)
        || E', in payment_charge\\n' || exception_class || ': ' || exception_message,
    CASE WHEN reason = 'retries_exhausted' THEN 13 ELSE 1 END,
    md5(i::text), '', failed - interval '20 minutes', failed, status,
    CASE WHEN status = 'dead' THEN '' ELSE 'ops@example.com' END,
    CASE WHEN status = 'dead' THEN NULL ELSE failed + interval '1 hour' END,
    CASE WHEN status = 'replayed' THEN gen_random_uuid()::text ELSE '' END,
    CASE WHEN status <> 'replayed' THEN '' WHEN mod(i, 10) = 0 THEN 'failed'
        ELSE 'succeeded' END
FROM (
    SELECT i, task, queue, reason, status,
        CASE reason
            WHEN 'retries_exhausted' THEN 'shop.gateway.client.GatewayUnavailable'
            WHEN 'permanent_error' THEN 'shop.gateway.client.GatewayRejected'
            WHEN 'time_limit' THEN 'billiard.exceptions.TimeLimitExceeded'
            WHEN 'worker_lost' THEN 'billiard.exceptions.WorkerLostError'
            WHEN 'poison' THEN 'jobs.errors.PoisonMessage'
            ELSE '' END AS exception_class,
        CASE reason
            WHEN 'retries_exhausted' THEN 'payment gateway answered 503'
            WHEN 'permanent_error' THEN '400: amount must be positive'
            WHEN 'time_limit' THEN 'TimeLimitExceeded(60,)'
            WHEN 'worker_lost' THEN 'Worker exited prematurely: signal 9 (SIGKILL).'
            WHEN 'poison' THEN 'delivered 6 times without finishing'
            ELSE 'QueueNotFound(''old'')' END AS exception_message,
        CASE WHEN status = 'dead'
            THEN now() - interval '2 hours' - interval '180 days' * (1 - i::float / %(m)s)
            ELSE now() - interval '2 hours' - interval '30 days' * (1 - i::float / %(m)s)
            END AS failed
    FROM (
        SELECT i,
            CASE WHEN r1 < 0.55 THEN %(charge)s WHEN r1 < 0.9 THEN %(receipt)s
                ELSE %(report)s END AS task,
            CASE WHEN r1 < 0.55 THEN 'payments' WHEN r1 < 0.9 THEN 'emails'
                ELSE 'reports' END AS queue,
            CASE WHEN r2 < 0.6 THEN 'retries_exhausted' WHEN r2 < 0.75 THEN 'permanent_error'
                WHEN r2 < 0.83 THEN 'time_limit' WHEN r2 < 0.9 THEN 'worker_lost'
                WHEN r2 < 0.95 THEN 'poison' ELSE 'unpublishable' END AS reason,
            CASE WHEN r3 < 0.3 THEN 'dead' WHEN r3 < 0.85 THEN 'replayed'
                ELSE 'discarded' END AS status
        FROM (SELECT i, random() AS r1, random() AS r2, random() AS r3
            FROM generate_series(1, %(m)s) AS i) AS draws
    ) AS mix
) AS rows
"""

# Orders over the outbox's 7 days (orders are never pruned: a real shop has more):
# 95 % paid, 3 % failed (declined), 2 % cancelled; the newest 10 in flight (pending).
_ORDERS = """
INSERT INTO shop_order (reference, idempotency_key, email, status, total, created_at,
    updated_at)
SELECT gen_random_uuid(), gen_random_uuid()::text, 'shopper' || mod(i, 5000) || '@example.com',
    CASE WHEN i > %(k)s - 10 THEN 'pending' WHEN r < 0.95 THEN 'paid' WHEN r < 0.98 THEN 'failed'
        ELSE 'cancelled' END,
    round((10 + 90 * r)::numeric, 2), created,
    created + CASE WHEN i > %(k)s - 10 THEN interval '0' ELSE interval '2 seconds' END
FROM (
    SELECT i, random() AS r,
        CASE WHEN i > %(k)s - 10 THEN now() - interval '5 seconds'
            ELSE now() - interval '7 days' + (interval '7 days' - interval '1 hour')
                * (i::float / %(k)s) END AS created
    FROM generate_series(1, %(k)s) AS i
) AS rows
"""

_PAYMENTS = """
INSERT INTO shop_payment (order_id, idempotency_key, amount, card_token, status,
    gateway_charge_id, failure_message, updated_at)
SELECT id, gen_random_uuid(), total, 'tok_visa',
    CASE status WHEN 'paid' THEN 'charged' WHEN 'failed' THEN 'declined'
        WHEN 'cancelled' THEN 'cancelled' ELSE 'pending' END,
    CASE WHEN status IN ('paid', 'failed') THEN 'ch_' || left(md5(id::text), 24) ELSE '' END,
    CASE status WHEN 'failed' THEN 'Your card was declined.'
        WHEN 'cancelled' THEN 'Cancelled: the payment did not go through in time.'
        ELSE '' END,
    updated_at
FROM shop_order
"""

# One receipt per paid order, sent; one in 1,000 abandoned (its dead letter discarded),
# one in 5,000 sent after a claim that ended unconfirmed (receipt_resent reports them).
_RECEIPTS = """
INSERT INTO shop_receipt (order_id, status, claimed_at, claimed_by, sent_at, attempts,
    unconfirmed_sends)
SELECT id, CASE WHEN mod(id, 1000) = 500 THEN 'abandoned' ELSE 'sent' END,
    updated_at + interval '1 second', md5(id::text) || '/1',
    CASE WHEN mod(id, 1000) = 500 THEN NULL ELSE updated_at + interval '2 seconds' END,
    1, CASE WHEN mod(id, 5000) = 2500 THEN 1 ELSE 0 END
FROM shop_order WHERE status = 'paid'
"""

# What the reconciler is for: paid orders whose receipt never went (its message lost),
# and payments whose charge message was lost (pending for 2 hours, before the deadline).
_GAPS = [
    "UPDATE shop_receipt SET status = 'pending', claimed_at = NULL, claimed_by = '',"
    " sent_at = NULL, attempts = 0 WHERE order_id IN (SELECT id FROM shop_order"
    " WHERE status = 'paid' ORDER BY id LIMIT %(gaps)s)",
    "CREATE TEMPORARY TABLE stuck AS SELECT id FROM shop_order WHERE status = 'paid'"
    " ORDER BY id DESC LIMIT %(gaps)s",
    "UPDATE shop_order SET status = 'pending', created_at = now() - interval '2 hours',"
    " updated_at = now() - interval '2 hours' WHERE id IN (SELECT id FROM stuck)",
    "UPDATE shop_payment SET status = 'pending', gateway_charge_id = '',"
    " updated_at = now() - interval '2 hours' WHERE order_id IN (SELECT id FROM stuck)",
    "DELETE FROM shop_receipt WHERE order_id IN (SELECT id FROM stuck)",
    "DROP TABLE stuck",
]


def _fill_ledger(bench: Bench) -> None:
    """One charge per charged or declined payment in the gateway's own ledger, as the
    gateway would have recorded it: the reconciler's ledger check compares the two. The
    database formats each row, so that this process only hands them to SQLite."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(_LEDGER)
        charges = cursor.fetchall()
    ledger = sqlite3.connect(bench.dir / "gateway.sqlite3", timeout=30)
    ledger.execute("PRAGMA cache_size = -262144")  # 256 MiB: its two unique indexes fit
    with ledger:
        ledger.executemany(
            "INSERT INTO charges (id, idempotency_key, status, amount, currency, card_last4,"
            " card_fingerprint, description, created, response_status, response_body)"
            " VALUES (?, ?, ?, ?, 'EUR', '4242', 'bench', ?, ?, ?, ?)",
            charges,
        )
    ledger.close()


_LEDGER = """
SELECT charge_id, key, status, amount, description, created,
    CASE WHEN status = 'succeeded' THEN 201 ELSE 402 END,
    json_build_object('id', charge_id, 'status', status, 'amount', amount, 'currency', 'EUR',
        'card_last4', '4242', 'idempotency_key', key, 'created', created,
        'description', description)::text
FROM (
    SELECT p.gateway_charge_id AS charge_id, p.idempotency_key::text AS key,
        CASE p.status WHEN 'charged' THEN 'succeeded' ELSE 'declined' END AS status,
        p.amount::text AS amount, 'Order #' || o.id || ' (' || o.reference || ')' AS description,
        to_char(o.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') AS created
    FROM shop_payment p JOIN shop_order o ON o.id = p.order_id
    WHERE p.status IN ('charged', 'declined') ORDER BY o.id
) AS charges
"""


# --- measuring -----------------------------------------------------------------------


def _relay(backlog: int) -> float:
    from jobs.outbox import relay_unsent

    started = time.monotonic()
    sent = relay_unsent(batch_size=backlog, stop_at=started + 600)
    seconds = time.monotonic() - started
    if sent != backlog:
        raise SystemExit(f"bench: the relay published {sent} of {backlog} unsent rows")
    return sent / seconds


def _staff_client(bench: Bench) -> httpx.Client:
    """A client logged in as a staff user through the admin's login form (its session
    cookie and CSRF token kept by the client's cookie jar)."""
    import secrets

    from django.contrib.auth.models import User

    password = secrets.token_urlsafe(16)
    user = User.objects.filter(username=STAFF_USER).first() or User(username=STAFF_USER)
    user.is_staff = user.is_superuser = True
    user.set_password(password)
    user.save()
    client = httpx.Client(base_url=bench.url(""), timeout=300)
    form = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    if form.status_code != 200 or token is None:
        raise SystemExit(f"bench: the admin login form answered {form.status_code}")
    answer = client.post(
        "/admin/login/",
        data={
            "username": STAFF_USER,
            "password": password,
            "csrfmiddlewaretoken": token.group(1),
            "next": "/admin/",
        },
        headers={"Referer": bench.url("/admin/login/")},
    )
    if answer.status_code != 302:
        raise SystemExit(f"bench: logging in to the admin answered {answer.status_code}")
    return client


def _median_ms(client: httpx.Client, path: str, count: int) -> float:
    """The median time of `count` GETs of `path`, after one warm-up GET per web process
    (each process caches the consumers it asked the workers about; the first scrape of
    a process waits for their answers, whatever the tables hold)."""
    times = []
    for index in range(10 + count):
        started = time.perf_counter()
        response = client.get(path)
        if response.status_code != 200:
            raise SystemExit(f"bench: GET {path} answered {response.status_code}")
        if index >= 10:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _unsent_link(client: httpx.Client) -> str:
    """Where the Operations page sends an operator for the outbox's unsent rows."""
    page = client.get("/admin/operations/").text
    link = re.search(r'<a href="([^"]+)">Unsent rows</a>', page)
    if link is None:
        raise SystemExit("bench: the Operations page links to no unsent outbox rows")
    return link.group(1).replace("&amp;", "&")


def _reconcile_time_limit() -> float:
    from jobs.celery import app
    from jobs.tasks import reconcile

    return float(reconcile.soft_time_limit or app.conf.task_soft_time_limit)


def _reconcile(runs: int) -> tuple[float, float]:
    """The reconciler's run as beat runs it (repairs included), and its ledger check
    alone (it reads the gateway's whole ledger): medians of `runs` runs, in ms."""
    from jobs.reconcile import Check, reconciler

    checks = dict(reconciler.checks)
    ledger: list[float] = []

    def timed(check: Check) -> Any:
        def run(**options: Any) -> Any:
            started = time.perf_counter()
            try:
                return check.run(**options)
            finally:
                ledger.append((time.perf_counter() - started) * 1000)

        return run

    totals = []
    reconciler.checks = {
        name: Check(c.name, c.description, timed(c)) if name == "ledger_mismatch" else c
        for name, c in checks.items()
    }
    try:
        for _ in range(runs):
            started = time.perf_counter()
            findings = reconciler.run(repair=True)
            totals.append((time.perf_counter() - started) * 1000)
    finally:
        reconciler.checks = checks
    failed = [f"{f.check_name}: {f.error}" for f in findings if f.error]
    if failed:
        raise SystemExit(f"bench: reconciliation checks could not run: {failed}")
    return statistics.median(totals), statistics.median(ledger)


def _replay(count: int) -> float:
    """`manage.py dlq replay` of `count` dead letters of one incident (charges that ran
    out of retries in the last 30 minutes), on top of the table as it was filled."""
    from django.core.management import call_command
    from django.test.utils import override_settings

    from jobs.models import DeadLetter
    from jobs.outbox import flush_marks

    _execute(_INCIDENT, {"count": count, "charge": CHARGE})
    _execute("ANALYZE jobs_deadletter")
    output = io.StringIO()
    with override_settings(JOBS_REPLAY_BATCH_PAUSE=0.0):
        started = time.monotonic()
        call_command("dlq", "replay", "--since", "1h", stdout=output)
        seconds = time.monotonic() - started
    flush_marks()
    done = DeadLetter.objects.filter(
        status=DeadLetter.Status.REPLAYED, last_failed_at__gte=_ago(3600)
    ).count()
    if done != count:
        raise SystemExit(f"bench: dlq replay replayed {done} of {count}: {output.getvalue()}")
    return count / seconds


_INCIDENT = """
INSERT INTO jobs_deadletter (task_id, task_name, args, kwargs, queue, reason,
    exception_class, exception_message, traceback, attempts, correlation_id, replay_of,
    first_failed_at, last_failed_at, status, handled_by, replay_task_id, replay_outcome)
SELECT gen_random_uuid()::text, %(charge)s, jsonb_build_array(i), '{}'::jsonb, 'payments',
    'retries_exhausted', 'shop.gateway.client.GatewayUnavailable',
    'payment gateway answered 503', 'Traceback (most recent call last): ...', 13,
    md5(i::text), '', now() - interval '50 minutes',
    now() - interval '30 minutes' + interval '20 minutes' * (i::float / %(count)s),
    'dead', '', '', ''
FROM generate_series(1, %(count)s) AS i
"""


def _ago(seconds: float) -> Any:
    from datetime import timedelta

    from django.utils import timezone

    return timezone.now() - timedelta(seconds=seconds)
