"""The eleven scenarios (the tenth in deploy/bench/scale.py, the eleventh in
deploy/bench/limits.py). Each measures the shop and its
baseline side by side, alternating which goes first in each repetition, so drift on a
noisy machine hits both alike.

A scenario returns one dict of figures per repetition; the report takes the median,
min and max of each across repetitions and checks the goals on the medians.
"""

import argparse
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx

from deploy.bench.load import Run, get, mixed, paced, paced_mixed, percentile
from deploy.bench.rig import NAIVE, ORDER_BODY, Bench, wait_until

Figures = dict[str, float]


@dataclass(frozen=True)
class Goal:
    key: str
    op: str  # ">=" or "<="
    bound: float
    # A goal on every repetition's samples pooled has one value for the run; `spread`
    # names the same figure measured per repetition, whose range the report shows.
    spread: str = ""

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.bound:g}"


@dataclass
class Result:
    number: int
    title: str
    goals: list[Goal]
    reps: list[Figures] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _alternate(rep: int, first: str, second: str) -> list[str]:
    return [first, second] if rep % 2 == 0 else [second, first]


def _latency(prefix: str, run: Run) -> Figures:
    return {
        f"{prefix}_p50_ms": run.percentile(50),
        f"{prefix}_p95_ms": run.percentile(95),
        f"{prefix}_p99_ms": run.percentile(99),
        f"{prefix}_per_s": run.per_second(),
        f"{prefix}_errors": float(run.errors),
    }


def _warm(bench: Bench, *requests: Callable[[], bytes]) -> None:
    for request in requests:
        bench.load(request, seconds=1.0)


# --- 1 ---------------------------------------------------------------------------------


def checkout(bench: Bench, args: argparse.Namespace) -> Result:
    """POST /api/orders/ vs a trivial Django JSON view on the same server, same clients.
    The charges wait in their queue (payments paused, purged after each run): this
    measures the web tier, not the workers sharing its 2 cores (scenario 3 does).
    A figure, not a goal: a checkout is a database transaction and a trivial view is
    not, so the ratio is set by the database (scenario 9 measures checkout against the
    bounds that matter: delay_on_commit, and the same rows in hand-written SQL)."""
    result = Result(1, "Checkout vs a trivial JSON view", [])
    hello = get("127.0.0.1", bench.web_port, "/bench/hello/")
    order = bench.request("/api/orders/")
    bench.pause("payments")
    _warm(bench, hello, order)
    for rep in range(args.reps):
        figures: Figures = {}
        for variant in _alternate(rep, "checkout", "hello"):
            run = bench.load(order if variant == "checkout" else hello, args.seconds)
            figures |= _latency(variant, run)
        figures["throughput_ratio"] = figures["checkout_per_s"] / figures["hello_per_s"]
        # Closed-loop clients keep the server saturated, so their latency is mostly time
        # in line (Little's law: clients / throughput). What a shopper sees below
        # saturation: an open-loop run at half the throughput just measured.
        rate = figures["checkout_per_s"] / 2
        paced_run = paced("127.0.0.1", bench.web_port, order, rate=rate, seconds=args.seconds)
        figures["half_load_per_s"] = rate
        figures["half_load_p50_ms"] = paced_run.percentile(50)
        figures["half_load_p99_ms"] = paced_run.percentile(99)
        figures["half_load_errors"] = float(paced_run.errors)
        result.reps.append(figures)
        bench.purge("payments")
    bench.resume("payments")
    result.notes.append(
        f"{bench.clients} concurrent clients, {args.seconds:g} s per run; half_load: one "
        "order every 2/checkout_per_s s, open loop"
    )
    return result


# --- 2 ---------------------------------------------------------------------------------


def inline(bench: Bench, args: argparse.Namespace) -> Result:
    """The async checkout vs the same checkout charging the card and sending the receipt
    inside the request, the gateway answering in 300 ms, at a steady rate the inline
    variant can still keep up with: `--load` x its capacity, measured first (latency,
    not capacity: scenario 1 saturates). Workers paused, queues purged: the inline
    variant must be the only one charging its orders."""
    result = Result(2, "Async checkout vs charge + email inline", [Goal("p50_speedup", ">=", 20)])
    bench.gateway_control(latency_ms=args.gateway_latency_ms)
    bench.pause("payments", "emails")
    asynchronous, synchronous = (
        bench.request("/api/orders/"),
        bench.request("/bench/orders-inline/", idempotent=False),
    )
    _warm(bench, asynchronous, synchronous)
    capacity = bench.load(synchronous, args.seconds).per_second()
    rate = args.load * capacity
    for rep in range(args.reps):
        figures: Figures = {"inline_capacity_per_s": capacity}
        for variant in _alternate(rep, "async", "inline"):
            request = asynchronous if variant == "async" else synchronous
            run = paced("127.0.0.1", bench.web_port, request, rate=rate, seconds=args.seconds)
            figures |= _latency(variant, run)
        figures["p50_speedup"] = figures["inline_p50_ms"] / figures["async_p50_ms"]
        result.reps.append(figures)
        bench.purge("payments", "emails")
    bench.gateway_control(latency_ms=0)
    bench.resume("payments", "emails")
    result.notes.append(
        f"gateway latency {args.gateway_latency_ms} ms; {args.load:g} x the inline "
        f"capacity measured first: {rate:.1f} orders/s for {args.seconds:g} s per run, open loop"
    )
    return result


# --- 3 and 6 ---------------------------------------------------------------------------


def drains(bench: Bench, args: argparse.Namespace) -> tuple[Result, Result]:
    """N orders placed while the payments and emails consumers are paused, then released:
    the time until every receipt is sent. Paired, in each repetition, with N x 2 bare
    no-op tasks through the same two workers (3), and with the naive pipeline on the
    same orders (6)."""
    pipeline = Result(3, "Pipeline drain vs bare no-op tasks", [Goal("drain_ratio", ">=", 0.5)])
    cost = Result(
        6,
        "Reliable vs naive pipeline",
        [Goal("throughput_ratio", ">=", 0.8)],
    )
    with bench.naive_workers():
        _drains(bench, args, pipeline, cost)
    note = f"{args.orders} orders per run; 2 tasks per order (charge, receipt)"
    pipeline.notes.append(note)
    cost.notes.append(
        "reliable: outbox, late acks, prefetch 1, conditional updates, receipt claim; "
        "naive: .delay() after commit, early acks, prefetch 4, plain saves"
    )
    return pipeline, cost


def _drains(bench: Bench, args: argparse.Namespace, pipeline: Result, cost: Result) -> None:
    _drain_noop(bench, min(args.orders, 100))  # warm-up
    _drain_orders(bench, min(args.orders, 100))
    for rep in range(args.reps):
        variants = ["noop", "reliable", "naive"]
        if rep % 2:
            variants.reverse()
        seconds = {}
        for variant in variants:
            if variant == "noop":
                seconds[variant] = _drain_noop(bench, args.orders)
            elif variant == "reliable":
                seconds[variant] = _drain_orders(bench, args.orders)
            else:
                seconds[variant] = _drain_naive(bench, args.orders)
        orders_per_s = args.orders / seconds["reliable"]
        noop_per_s = 2 * args.orders / seconds["noop"]
        naive_per_s = args.orders / seconds["naive"]
        pipeline.reps.append(
            {
                "orders_per_s": orders_per_s,
                "noop_tasks_per_s": noop_per_s,
                "drain_ratio": orders_per_s / (noop_per_s / 2),
            }
        )
        cost.reps.append(
            {
                "reliable_orders_per_s": orders_per_s,
                "naive_orders_per_s": naive_per_s,
                "throughput_ratio": orders_per_s / naive_per_s,
            }
        )
    bench.resume(*NAIVE)


def _released(bench: Bench, done: Callable[[], bool], *, naive: bool = False) -> float:
    started = time.monotonic()
    bench.resume(*NAIVE, naive=naive)
    finished = wait_until("the drain", done, timeout=600)
    bench.pause(*NAIVE, naive=naive)
    return finished - started


def _drain_noop(bench: Bench, count: int) -> float:
    from jobs.celery import app

    bench.pause(*NAIVE)
    with app.producer_or_acquire() as producer:
        for index in range(2 * count):
            app.send_task("bench.noop", queue=NAIVE[index % 2], producer=producer)
    return _released(bench, lambda: bench.idle(*NAIVE))


def _drain_orders(bench: Bench, count: int) -> float:
    bench.pause(*NAIVE)
    first, placed = bench.place_orders(count)
    return _released(bench, lambda: bench.receipts_sent(first) >= placed)


def _drain_naive(bench: Bench, count: int) -> float:
    """The same orders, charged by the naive pipeline: the shop's own charge messages are
    purged and each payment is sent to `bench.naive_charge` with a bare publish."""
    from jobs.celery import app
    from shop.models import Payment

    bench.pause(*NAIVE)
    first, placed = bench.place_orders(count)
    bench.purge("payments")
    payments = Payment.objects.filter(order_id__gte=first).values_list("pk", flat=True)
    with app.producer_or_acquire() as producer:
        for payment in payments:
            app.send_task("bench.naive_charge", args=[payment], queue="payments", producer=producer)
    return _released(bench, lambda: bench.receipts_sent(first) >= placed, naive=True)


# --- 4 ---------------------------------------------------------------------------------


def enqueue_latency(bench: Bench, args: argparse.Namespace) -> Result:
    """From the COMMIT that enqueues (outbox row, after-commit publish) to the first line
    of the task, on an idle `default` worker; vs a bare apply_async to the same task."""
    from django.db import transaction

    from deploy.bench.tasks import PROBE_KEY
    from jobs.celery import app
    from jobs.outbox import enqueue

    result = Result(4, "Enqueue -> start: outbox vs bare apply_async", [Goal("p99_ratio", "<=", 2)])

    def outbox(token: str) -> float:
        with transaction.atomic():
            enqueue("bench.probe", args=[token])
            sent = time.time()  # the COMMIT and the publish come next
        return sent

    def bare(token: str) -> float:
        sent = time.time()
        app.send_task("bench.probe", args=[token])
        return sent

    bench.client.delete(PROBE_KEY)
    for rep in range(args.reps + 1):  # the first round warms up
        sent: dict[str, tuple[str, float]] = {}
        for index in range(args.probes):
            for variant in _alternate(rep + index, "outbox", "bare"):
                token = uuid.uuid4().hex
                sent[token] = (variant, (outbox if variant == "outbox" else bare)(token))
                time.sleep(args.probe_gap)  # the worker is idle again before the next
        wait_until("the probes", partial(_arrived, bench, len(sent)), 60)
        waits: dict[str, list[float]] = {"outbox": [], "bare": []}
        for raw in bench.client.lrange(PROBE_KEY, 0, -1):
            token, started = json.loads(raw)
            variant, at = sent[token]
            waits[variant].append(started - at)
        bench.client.delete(PROBE_KEY)
        if rep == 0:
            continue
        figures: Figures = {}
        for variant, values in waits.items():
            figures[f"{variant}_p50_ms"] = percentile(values, 50) * 1000
            figures[f"{variant}_p99_ms"] = percentile(values, 99) * 1000
        figures["p99_ratio"] = figures["outbox_p99_ms"] / figures["bare_p99_ms"]
        result.reps.append(figures)
    result.notes.append(f"{args.probes} probes of each kind per repetition")
    return result


def _arrived(bench: Bench, count: int) -> bool:
    from deploy.bench.tasks import PROBE_KEY

    return int(bench.client.llen(PROBE_KEY)) >= count


# --- 5 ---------------------------------------------------------------------------------


def isolation(bench: Bench, args: argparse.Namespace) -> Result:
    """The queue wait of charge_payment (publish -> start, from the payments worker's
    `started` log lines) for orders placed at a steady rate, with 10,000 sales reports
    queued (one running) vs none. Each of the stack's processes runs in a cgroup weighted
    and limited as its Deployment is in deploy/k8s (deploy/bench/cpu.py): on one host,
    that is what keeps a bulk pool from slowing the urgent ones. The rate is a share of
    the pipeline's capacity, measured first in the same run, so a slower machine gets a
    lighter load instead of a queue that only grows; each variant places enough orders
    for a p99 of `--samples` waits. The goal is checked on the waits of every repetition
    pooled: a one-second stall of the whole machine (it happens to either variant) delays
    some 40 waits and decides the p99 of the repetition it falls in; pooled, one rare
    stall no longer decides the verdict (several in one variant still would)."""
    from jobs.celery import app

    goal = Goal("pooled_p99_ratio", "<=", 1.5, spread="p99_ratio")
    result = Result(5, "Payment queue wait: reports queued vs none", [goal])
    pooled: dict[str, list[float]] = {"quiet": [], "busy": []}
    _drain_orders(bench, min(args.orders, 50))  # warm-up: the first drain is slower
    capacity = min(args.orders, 300) / _drain_orders(bench, min(args.orders, 300))
    bench.resume(*NAIVE)  # the drain leaves the consumers paused
    rate = args.load * capacity
    seconds = args.samples / rate
    for rep in range(args.reps):
        figures: Figures = {"capacity_orders_per_s": capacity, "orders_per_s": rate}
        for variant in _alternate(rep, "quiet", "busy"):
            if variant == "busy":
                with app.producer_or_acquire() as producer:
                    for _ in range(args.reports):
                        app.send_task("shop.tasks.reports.build_sales_report", producer=producer)
            waits = _paced_charge_waits(bench, rate, seconds)
            pooled[variant] += waits
            figures[f"{variant}_reports_queued"] = float(bench.depth("reports"))
            figures[f"{variant}_samples"] = float(len(waits))
            for q in (50, 95, 99):
                figures[f"{variant}_p{q}_ms"] = percentile(waits, q)
            bench.purge("reports")
            # The report still running would share the CPU with the next, quiet, run.
            wait_until("the last report", lambda: bench.idle("reports"), timeout=600, every=0.2)
        figures["p95_ratio"] = figures["busy_p95_ms"] / figures["quiet_p95_ms"]
        figures["p99_ratio"] = figures["busy_p99_ms"] / figures["quiet_p99_ms"]
        result.reps.append(figures)
    for q in (95, 99):
        ratio = percentile(pooled["busy"], q) / percentile(pooled["quiet"], q)
        for figures in result.reps:
            figures[f"pooled_p{q}_ratio"] = ratio
    result.notes.append(
        f"pooled: {len(pooled['quiet'])} quiet and {len(pooled['busy'])} busy waits; "
        f"{args.load:g} x the drain capacity measured first ({capacity:.0f} orders/s): "
        f"{rate:.1f} orders/s for {seconds:.0f} s per run; {bench.cpu.describe()}"
    )
    return result


def _paced_charge_waits(bench: Bench, rate: float, seconds: float) -> list[float]:
    from jobs.models import OutboxMessage

    since = time.time()
    first = _paced_orders(bench, rate, seconds)
    wait_until("the paced orders", lambda: bench.receipts_sent(first[0]) >= first[1], 120)
    task_ids = {
        str(t)
        for t in OutboxMessage.objects.filter(
            task_name="shop.tasks.payments.charge_payment", created_at__gte=_aware(since)
        ).values_list("task_id", flat=True)
    }
    return [w for task_id, w in _started_waits(bench) if task_id in task_ids]


def _paced_orders(bench: Bench, rate: float, seconds: float) -> tuple[int, int]:
    from shop.models import Order

    first = (Order.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1
    placed = 0
    with httpx.Client(base_url=bench.url(""), timeout=30) as client:
        start = time.monotonic()
        for index in range(round(rate * seconds)):
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            response = client.post(
                "/api/orders/",
                content=ORDER_BODY,
                headers={"Content-Type": "application/json"},
            )
            placed += response.status_code == 201
    return first, placed


def _started_waits(bench: Bench) -> Iterator[tuple[str, float]]:
    for line in (bench.dir / "worker-payments.log").read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") == "started" and record.get("wait_ms") is not None:
            yield record["task_id"], float(record["wait_ms"])


def _aware(timestamp: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC)


# --- 7 ---------------------------------------------------------------------------------


def broker_down(bench: Bench, args: argparse.Namespace) -> Result:
    """Checkout with Redis unreachable vs up, two ways: SIGKILLed (connection refused at
    once) and SIGSTOPped (frozen: connections open, no answer ever comes, as with a hung
    or partitioned broker). The payments and emails workers are stopped first so no run
    shares the CPU with them. Afterwards Redis comes back from its AOF and the outbox
    relay must publish every row left unsent."""
    from django.conf import settings

    from jobs.models import OutboxMessage

    result = Result(
        7,
        "Checkout with Redis down vs up",
        [
            Goal("down_p99_ratio", "<=", 2),
            Goal("down_errors", "<=", 0),
            Goal("frozen_p99_ratio", "<=", 2),
            Goal("frozen_errors", "<=", 0),
        ],
    )
    for name in ("worker-payments", "worker-emails"):
        bench.stop_process(name)
    order = bench.request("/api/orders/")
    _warm(bench, order)
    redis = bench.procs["redis"]
    # What a deployment restarts when it exits: a worker can exit on a broker killed
    # under it (Stack.restart_exited), and a dead `default` worker runs no relay.
    supervised = [
        name
        for name, proc in bench.procs.items()
        if name.startswith(("worker-", "beat")) and proc.poll() is None
    ]
    restarted: list[str] = []
    for rep in range(args.reps):
        figures: Figures = {}
        variants = ["up", "down", "frozen"]
        for variant in variants[rep % 3 :] + variants[: rep % 3]:
            if variant == "down":
                bench.stop_process("redis", signal.SIGKILL)
            elif variant == "frozen":
                redis.send_signal(signal.SIGSTOP)
            figures |= _latency(variant, bench.load(order, args.seconds))
            if variant == "down":
                bench.redis()
                redis = bench.procs["redis"]
            elif variant == "frozen":
                redis.send_signal(signal.SIGCONT)
            if variant != "up":
                # Each web process left publishing to the relay when the broker failed
                # it (jobs/outbox.py): wait that out, or the next run would publish nothing.
                time.sleep(settings.JOBS_OUTBOX_PUBLISH_PAUSE)
                restarted += bench.restart_exited(supervised)
                _warm(bench, order)
        figures["down_p99_ratio"] = figures["down_p99_ms"] / figures["up_p99_ms"]
        figures["frozen_p99_ratio"] = figures["frozen_p99_ms"] / figures["up_p99_ms"]
        result.reps.append(figures)
    unsent = OutboxMessage.objects.filter(sent_at__isnull=True)
    deadline = time.monotonic() + 60
    while unsent.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
        restarted += bench.restart_exited(supervised)
    left = unsent.count()
    result.reps[-1]["unsent_after_60s"] = float(left)  # reported with the last repetition
    result.reps[-1]["processes_restarted"] = float(len(restarted))
    result.notes.append(
        "after Redis came back the relay published every outbox row left unsent"
        if not left
        else f"{left} outbox row(s) still unsent a minute after Redis came back"
    )
    if restarted:
        result.notes.append(
            "exited on their own and restarted, as a supervisor would: " + ", ".join(restarted)
        )
    return result


# --- 8 ---------------------------------------------------------------------------------


def pools(bench: Bench, args: argparse.Namespace) -> Result:
    """The pipeline drain (as in 3) with a real processor's and mail server's latency
    against none, on two pools for the I/O-bound queues: a prefork pool of 2 processes
    each and a threads pool (`--threads` each). Payments and emails
    wait on the network, not the CPU, so a prefork pool sized for the CPU caps the drain
    at concurrency / latency whatever the machine; threads wait side by side."""
    result = Result(
        8,
        "Drain with real latencies vs none, per pool",
        [Goal("threads_latency_ratio", ">=", 0.8)],
    )
    options = {
        "prefork": ("-P", "prefork", "-c", "2"),  # what make run ran before scenario 8
        "threads": ("-P", "threads", "-c", str(args.threads)),
    }
    real = {
        "gateway_ms": args.gateway_latency_ms,
        "jitter_ms": args.gateway_jitter_ms,
        "mail_ms": args.mail_latency_ms,
    }
    for rep in range(args.reps):
        figures: Figures = {}
        for pool in _alternate(rep, "prefork", "threads"):
            bench.restart_workers(*NAIVE, options=options[pool])
            bench.latencies(gateway_ms=0)
            _drain_orders(bench, min(args.orders, 50))  # warm the new pool
            for latency in _alternate(rep, "none", "real"):
                bench.latencies(**(real if latency == "real" else {"gateway_ms": 0}))
                seconds = _drain_orders(bench, args.orders)
                figures[f"{pool}_{latency}_orders_per_s"] = args.orders / seconds
            figures[f"{pool}_latency_ratio"] = (
                figures[f"{pool}_real_orders_per_s"] / figures[f"{pool}_none_orders_per_s"]
            )
        figures["threads_vs_prefork_real"] = (
            figures["threads_real_orders_per_s"] / figures["prefork_real_orders_per_s"]
        )
        result.reps.append(figures)
    bench.latencies(gateway_ms=0)
    bench.restart_workers(*NAIVE)  # the Procfile's pools again, for the scenarios after
    result.notes.append(
        f"{args.orders} orders per drain; real: gateway {args.gateway_latency_ms} ms + "
        f"uniform 0-{args.gateway_jitter_ms} ms, mail {args.mail_latency_ms} ms; prefork: "
        f"2 processes per worker; threads: {args.threads} per worker"
    )
    return result


# --- 9 ---------------------------------------------------------------------------------


def bounds(bench: Bench, args: argparse.Namespace) -> Result:
    """Checkout through the outbox vs what a team would pick instead, Celery's own
    `delay_on_commit` (no outbox row), and vs the same rows in one hand-written SQL
    transaction: through the same gunicorn (`sql`) and from this process's threads with
    no HTTP (`sql_direct`): the database's own bound. Each alone with closed-loop
    clients (throughput; PostgreSQL counts its commits: transactions that wrote); then
    outbox and delay_on_commit side by side in the same seconds, for the goals: closed
    loop, half the clients each (throughput), and open loop at half of the capacity just
    measured, taking turns (p99). Queries are counted per checkout (the view, called in
    this process) and per task (every task the workers ran: deploy/bench/tasks.py)."""
    from deploy.bench.tasks import QUERIES_KEY, TASKS_KEY

    result = Result(
        9,
        "Checkout: outbox vs delay_on_commit vs hand-written SQL",
        [
            Goal("on_commit_throughput_ratio", ">=", 0.9),
            Goal("on_commit_pooled_p99_ratio", ">=", 0.9, spread="on_commit_p99_ratio"),
        ],
    )
    pooled: dict[str, list[float]] = {"outbox": [], "on_commit": []}  # every rep's answers
    requests = {
        "outbox": bench.request("/api/orders/"),
        "on_commit": bench.request("/bench/orders-on-commit/"),
        "sql": bench.request("/bench/orders-sql/"),
    }
    pair = {name: requests[name] for name in ("outbox", "on_commit")}
    bench.pause("payments")
    _warm(bench, *requests.values())
    for rep in range(args.reps):
        figures: Figures = {}
        variants = list(requests)
        for variant in variants[rep % 3 :] + variants[: rep % 3]:
            before = bench.writes()
            run = bench.load(requests[variant], args.seconds)
            figures |= _latency(variant, run)
            figures[f"{variant}_commits_per_checkout"] = (bench.writes() - before) / run.ok
        figures["sql_direct_per_s"] = _sql_direct(bench, args.seconds)
        runs = mixed("127.0.0.1", bench.web_port, pair, clients=bench.clients, seconds=args.seconds)
        for variant, run in runs.items():
            figures[f"{variant}_side_by_side_per_s"] = run.per_second()
        rate = sum(run.per_second() for run in runs.values()) / 2
        runs = paced_mixed(  # three times as long: a p99 of more answers
            "127.0.0.1", bench.web_port, pair, rate=rate, seconds=3 * args.seconds
        )
        for variant, run in runs.items():
            pooled[variant] += run.latencies
            figures[f"{variant}_half_load_p50_ms"] = run.percentile(50)
            figures[f"{variant}_half_load_p99_ms"] = run.percentile(99)
            figures[f"{variant}_half_load_errors"] = float(run.errors)
        figures["half_load_per_s"] = rate
        figures["on_commit_throughput_ratio"] = (
            figures["outbox_side_by_side_per_s"] / figures["on_commit_side_by_side_per_s"]
        )
        # >= 0.9 reads as for throughput: the outbox at least 0.9 x as fast at the p99.
        figures["on_commit_p99_ratio"] = (
            figures["on_commit_half_load_p99_ms"] / figures["outbox_half_load_p99_ms"]
        )
        figures["sql_throughput_ratio"] = figures["outbox_per_s"] / figures["sql_per_s"]
        figures["sql_direct_throughput_ratio"] = (
            figures["outbox_per_s"] / figures["sql_direct_per_s"]
        )
        result.reps.append(figures)
        bench.purge("payments")
    # The goal on every repetition's answers pooled: a stall of the whole machine decides
    # the p99 of the repetition it falls in; pooled, one rare stall does not (see 5).
    ratio = percentile(pooled["on_commit"], 99) / percentile(pooled["outbox"], 99)
    for figures in result.reps:
        figures["on_commit_pooled_p99_ratio"] = ratio
    bench.resume("payments")
    bench.client.delete(QUERIES_KEY, TASKS_KEY)
    _drain_orders(bench, min(args.orders, 100))
    bench.resume(*NAIVE)  # the drain leaves the consumers paused
    figures = result.reps[-1]  # counts, not speeds: reported with the last repetition
    figures["queries_per_checkout"] = _checkout_queries()
    queries, tasks = bench.client.hgetall(QUERIES_KEY), bench.client.hgetall(TASKS_KEY)
    for name, key in (("charge_payment", "payments"), ("send_receipt", "receipts")):
        task = next((t for t in tasks if t.decode().endswith(f".{name}")), None)
        if task is not None:
            figures[f"queries_per_{key}_task"] = int(queries[task]) / int(tasks[task])
    result.notes.append(
        f"{bench.clients} concurrent clients, {args.seconds:g} s per run (sql_direct: as "
        "many threads, one connection each); side by side: half the clients each; "
        f"half_load: open loop, the two taking turns, for {3 * args.seconds:g} s; sql "
        "writes the outbox row already sent and publishes nothing"
    )
    return result


def _sql_direct(bench: Bench, seconds: float) -> float:
    """Checkouts per second, `bench.clients` threads running sql_checkout back to back."""
    import threading

    import psycopg

    from deploy.bench.sql import sql_checkout

    data = json.loads(ORDER_BODY)
    done = [0] * bench.clients
    until = time.monotonic() + seconds

    def client(index: int) -> None:
        with psycopg.connect(bench.database_url) as conn:
            while time.monotonic() < until:
                sql_checkout(conn, data, str(uuid.uuid4()))
                done[index] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(bench.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def _checkout_queries() -> float:
    """SQL queries of one checkout through the API view, after-commit work included."""
    from django.db import connection
    from django.test import RequestFactory
    from django.test.utils import CaptureQueriesContext

    from shop.views import api

    request = RequestFactory().post(
        "/api/orders/",
        ORDER_BODY,
        content_type="application/json",
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    with CaptureQueriesContext(connection) as queries:
        response = api.orders(request)
    assert response.status_code == 201, response.content
    return float(len(queries))


# --- 10 --------------------------------------------------------------------------------


def scale(bench: Bench, args: argparse.Namespace) -> Result:
    """Cost as tables grow: deploy/bench/scale.py."""
    from deploy.bench import scale  # it builds on this module's Result and Goal

    return scale.scale(bench, args)


# --- 11 --------------------------------------------------------------------------------


def limits(bench: Bench, args: argparse.Namespace) -> Result:
    """A rate-limited gateway: deploy/bench/limits.py."""
    from deploy.bench import limits  # it builds on this module's Result and Goal

    return limits.limits(bench, args)


SCENARIOS: dict[str, Callable[[Bench, argparse.Namespace], Any]] = {
    "checkout": checkout,
    "bounds": bounds,
    "inline": inline,
    "isolation": isolation,
    "drains": drains,
    "pools": pools,
    "enqueue": enqueue_latency,
    "scale": scale,
    "limits": limits,
    "broker_down": broker_down,
}
