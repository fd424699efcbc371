"""Scenario 11: a gateway that limits how fast the shop may call it, as processors do.

The gateway refuses more than `--rate-limit` calls a clock second (429); the shop's own
limiter, shared by every payments worker through Redis (jobs/dependencies.py), is set a
little below it (`--limit-margin`), as a team would set it. 2,000 orders wait for 1, 2
and 4 payments workers (each the Procfile's threads pool, in a CPU group of its own, as
replicas of its Deployment), which are then let go together. The gateway's own count of
each second (GET /v1/stats) is the witness: no second above the limit, and the limit
used, not wasted. Then 10,000 dead letters of charges, replayed at once, the way an
operator would after an outage (`dlq replay`): the same witness.
"""

import argparse
import time
import uuid
from typing import Any

from deploy.bench.rig import Bench, wait_until
from deploy.bench.scenarios import Figures, Goal, Result

WORKER_COUNTS = (1, 2, 4)
CHARGE = "shop.tasks.payments.charge_payment"


def _replicas(bench: Bench, count: int) -> list[str]:
    """Node names of `count` payments workers, started with the shop's limit set."""
    names = ["payments"] + [f"payments-{n}" for n in range(2, count + 1)]
    for name in names:
        if f"worker-{name}" in bench.procs:
            bench.stop_process(f"worker-{name}")
        bench.worker("payments", name=name)
    nodes = [bench.node(name) for name in names]
    wait_until("the payments workers", lambda: len(bench.ping(nodes)) == len(nodes), 120)
    return nodes


def _stop_replicas(bench: Bench) -> None:
    for name in [n for n in bench.procs if n.startswith("worker-payments-")]:
        bench.stop_process(name)
        del bench.procs[name]


def _consumers(bench: Bench, command: str, nodes: list[str]) -> None:
    from jobs.celery import app, control_connection

    with control_connection() as connection:  # not a pooled one (jobs/NOTES.md §10)
        replies = app.control.broadcast(
            command,
            arguments={"queue": "payments"},
            destination=nodes,
            reply=True,
            timeout=5,
            connection=connection,
        )
    if len(replies) != len(nodes):
        raise SystemExit(f"bench: only {len(replies)} of {len(nodes)} answered {command}")


def _paid(first_order: int) -> int:
    from shop.models import Order

    return Order.objects.filter(pk__gte=first_order, status=Order.Status.PAID).count()


def _connections() -> str:
    """The database connections open now, of PostgreSQL's max_connections: every thread
    of every worker keeps one once it ran a task, and the four payments workers need 64."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), current_setting('max_connections') FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
        )
        used, most = cursor.fetchone()
    return f"{used} of {most} database connections in use at the end"


def _busiest(seconds: list[dict[str, Any]], label: str) -> str:
    """The busiest second beside its neighbours: a burst between quiet seconds is calls
    that reached the gateway late and together (a stalled worker), a plateau is the
    limiter's own rate."""
    if not seconds:
        return f"{label}: no calls"
    at = max(range(len(seconds)), key=lambda n: seconds[n]["received"])
    around = [str(row["received"]) for row in seconds[max(0, at - 3) : at + 4]]
    return f"{label}: busiest second {seconds[at]['received']} calls, with its neighbours " + (
        ", ".join(around)
    )


def _witness(seconds: list[dict[str, Any]], limit: int, drained: float) -> Figures:
    charges = sum(row["charges"] for row in seconds)
    return {
        "max_received_per_s": float(max((row["received"] for row in seconds), default=0)),
        "refused": float(sum(row["refused"] for row in seconds)),
        "charges_per_s": charges / drained,
        "max_second_ratio": max((row["received"] for row in seconds), default=0) / limit,
        "charges_ratio": charges / drained / limit,
    }


def _drain(bench: Bench, nodes: list[str], orders: int, limit: int) -> tuple[Figures, str]:
    """Place `orders` with the payments consumers paused, let them all go, and read the
    gateway's seconds from then until the last order is paid."""
    _consumers(bench, "cancel_consumer", nodes)
    first, placed = bench.place_orders(orders)
    started = time.time()
    _consumers(bench, "add_consumer", nodes)
    wait_until("every order paid", lambda: _paid(first) >= placed, timeout=1800, every=0.2)
    ended = time.time()
    seconds = bench.gateway_seconds(started)
    witness = _witness(seconds, limit, ended - started)
    return witness, f"{_busiest(seconds, f'{len(nodes)} worker(s)')}; {_connections()}"


def _replay(bench: Bench, nodes: list[str], count: int, limit: int) -> tuple[Figures, str]:
    """`count` charges dead-lettered (their orders placed, their messages dropped, as
    after an outage that exhausted their retries), replayed at once."""
    from jobs.dead_letters import dead_letter_replay
    from jobs.models import DeadLetter
    from shop.models import Payment

    _consumers(bench, "cancel_consumer", nodes)
    first, placed = bench.place_orders(count)
    bench.purge("payments")
    payments = Payment.objects.filter(order_id__gte=first).values_list("pk", flat=True)
    letters = DeadLetter.objects.bulk_create(
        DeadLetter(
            task_id=str(uuid.uuid4()), task_name=CHARGE, args=[pk], reason="retries_exhausted"
        )
        for pk in payments
    )
    _consumers(bench, "add_consumer", nodes)
    started = time.time()
    dead_letter_replay(ids=[letter.pk for letter in letters], actor="bench")
    wait_until("every replayed order paid", lambda: _paid(first) >= placed, 3600, every=0.5)
    ended = time.time()
    seconds = bench.gateway_seconds(started)
    figures = _witness(seconds, limit, ended - started)
    note = f"{_busiest(seconds, 'replay')}; {_connections()}"
    return {f"replay_{key}": value for key, value in figures.items()}, note


def limits(bench: Bench, args: argparse.Namespace) -> Result:
    """2,000 orders against a gateway limited to 50 calls a second, with 1, 2 and 4
    payments workers; then 10,000 dead letters replayed."""
    limit = args.rate_limit
    result = Result(
        11,
        f"Gateway limited to {limit}/s: 1, 2 and 4 payments workers, and a replay",
        [Goal(f"w{n}_max_second_ratio", "<=", 1.0) for n in WORKER_COUNTS]
        + [Goal(f"w{n}_charges_ratio", ">=", 0.9) for n in WORKER_COUNTS]
        + [Goal("replay_max_second_ratio", "<=", 1.0)],
    )
    shop_limit = args.limit_margin * limit
    busiests: list[str] = []
    bench.env["PAYMENT_GATEWAY_RATE_LIMIT"] = str(shop_limit)
    bench.gateway_control(rate_limit=limit)
    try:
        for rep in range(args.reps):
            figures: Figures = {}
            counts = WORKER_COUNTS if rep % 2 == 0 else tuple(reversed(WORKER_COUNTS))
            for count in counts:
                drained, busiest = _drain(bench, _replicas(bench, count), args.limit_orders, limit)
                figures |= {f"w{count}_{key}": value for key, value in drained.items()}
                busiests.append(busiest)
                _stop_replicas(bench)
            result.reps.append(figures)
        nodes = _replicas(bench, max(WORKER_COUNTS))
        replayed, busiest = _replay(bench, nodes, args.replays, limit)
        result.reps[-1] |= replayed  # once, with the last repetition
        busiests.append(busiest)
    finally:
        bench.gateway_control(rate_limit=None)
        bench.env["PAYMENT_GATEWAY_RATE_LIMIT"] = "0"
        _stop_replicas(bench)
        _replicas(bench, 1)  # the Procfile's one payments worker, unlimited, for what follows
    result.notes.append(
        f"{args.limit_orders} orders per drain; the gateway refuses above {limit} calls a "
        f"clock second, the shop's shared limiter allows {shop_limit:g}; seconds and "
        f"charges counted by the gateway; replay: {args.replays} dead letters, 4 workers"
    )
    result.notes.extend(busiests)
    return result
