"""`make chaos`: the failure lab. Places orders over HTTP while killing things, then
judges the outcome by independent witnesses, not by the shop's own bookkeeping:

  - accepted orders (HTTP 201) vs orders that reached a terminal state or a dead letter;
  - the payment gateway's own ledger: charges per order;
  - the mail folder: receipts per Message-ID;
  - the dead-letter table: no declined card there (a decline is the order's final state);
  - orders in the database vs orders the clients placed: a client retry (same
    Idempotency-Key) never places a second order.

Runs the full stack on PostgreSQL (database `shop_chaos`, recreated) with a private
Redis that persists like a broker should (AOF everysec, noeviction). Faults run in a
seeded rotation, so every kind happens in a long enough run. Then the replay step: the
gateway is fixed, `manage.py dlq replay --reason retries_exhausted` runs, and the verdict
is taken again, now with every accepted order paid and receipted. Exit status 0 only
when every invariant holds, both times.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import redis

from deploy.lab_admin import AdminSession
from deploy.lab_alerts import (
    RESOLVE_BOUND,
    AlertWatch,
    Watched,
    fire_bound,
    quiet_row,
    screenshot,
    start_prometheus,
    watched_rows,
)
from deploy.latency_proxy import LatencyProxy
from deploy.stack import BASE_DIR, QUEUES, Stack, choose, free_port, wait_for
from deploy.watch import ALERTS_PAGE, BINARY, MISSING

GOOD, DECLINED = "tok_visa", "tok_chargeDeclined"  # the gateway's test tokens
SKUS = ["MUG-001", "TEE-002", "BAG-003", "PEN-004", "NBK-005", "CAP-006"]
CHARGE, RECEIPT = "shop.tasks.payments.charge_payment", "shop.tasks.emails.send_receipt"
OPERATOR, OPERATOR_PASSWORD = "lab-operator", "lab-operator-password"
BREAKER_COOLDOWN = 5.0  # seconds a dependency's open breaker waits before its probe


def over_published(
    rows: list[str], publishes: dict[str, list[str]], duplicated: Counter[str]
) -> dict[str, list[str]]:
    """The outbox rows published more than twice (after commit, and by the relay), with
    who published them: each duplicate_delivery fault adds two publishes of its own to the
    row it chose, and after the load it may choose the same (newest) row again."""
    return {
        row: publishes[row] for row in rows if len(publishes.get(row, [])) - 2 * duplicated[row] > 2
    }


def first_publish(event: dict[str, Any]) -> bool:
    """A `task-sent` event of a task's first attempt, sent by whoever enqueued it: not a
    retry (retries above 0), nor a deferral (retries 0, with an ETA; Lab.watch_publishes)."""
    return not event.get("retries") and not event.get("eta")


class Lab(Stack):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            prefix="chaos-",
            database_url=args.database_url,
            env={
                # Quick recovery: relay every 2 s, reconcile stuck orders after 1 minute.
                "OUTBOX_RELAY_INTERVAL": "2",
                "OUTBOX_RELAY_GRACE": "2",
                "RECONCILE_INTERVAL": "15",
                "RECONCILE_AFTER_MINUTES": "1",
                # The shipped retry policy, 40 times faster: 12 retries that wait at least
                # 21 s in all (the shipped 14 minutes / 40). The gateway outage (15 s) is
                # longer than the policy this one replaced ever waited (62 s / 40) and must
                # dead-letter nothing.
                "RETRY_MAX_RETRIES": "12",
                "RETRY_BACKOFF_BASE": "0.05",
                "RETRY_BACKOFF_CAP": "7.5",
                "RETRY_OUTAGE_BUDGET": "0",  # short on purpose: no start-up warning
                # Orders nobody paid or decided on are cancelled after this (24 h shipped).
                "ORDER_PAYMENT_DEADLINE": str(args.payment_deadline),
                "EMAIL_BACKEND": "deploy.lab_mail.TrapFileBackend",
                "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "2",
                "GATEWAY_FAILURE_RATE": str(args.gateway_failure_rate),
                "GATEWAY_TIMEOUT_RATE": str(args.gateway_timeout_rate),
                "GATEWAY_TIMEOUT_SECONDS": "17",  # past the client's 15 s read timeout
                "GATEWAY_SEED": str(args.seed),
                # A processor's rate limit for the whole run, and the shop's own shared
                # limiter a little below it, as a team sets it; a breaker whose cooldown
                # fits the lab's 15 s outage three times.
                "GATEWAY_RATE_LIMIT": str(args.gateway_rate_limit),
                "PAYMENT_GATEWAY_RATE_LIMIT": str(0.95 * args.gateway_rate_limit),
                "BREAKER_COOLDOWN": str(BREAKER_COOLDOWN),
                "BREAKER_RAMP": "5",
                # The canaries at the alerts' lab clock (deploy/lab_alerts.py: 30 s / 10).
                "CANARY_INTERVAL": "3",
                "LOG_LEVEL": "WARNING",
            },
        )
        # Every client reaches Redis through a proxy that can make it slow (slow_broker).
        self.proxy = LatencyProxy(self.redis_port).start()
        self.env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{self.proxy.port}/0"
        self.args = args
        self.rng = random.Random(args.seed)
        self.faults: list[tuple[float, str]] = []
        self.lock = threading.Lock()  # faults and the supervisor do not restart at once
        self.exits: list[str] = []  # processes restarted: exited, or failed the liveness probe
        self.trapped_mails = 0
        self.initial_stock: dict[str, int] = {}
        self.decisions: Counter[str] = Counter()  # what the lab's operator did
        self.duplicated: Counter[str] = Counter()  # rows published twice at once, by id
        # First publishes seen, per task id: who sent each, and when.
        self.publishes: defaultdict[str, list[str]] = defaultdict(list)
        self.stale_edits = 0
        self.outages: list[tuple[float, float, int]] = []  # gateway outages: start, end, calls
        self.held: set[str] = set()  # processes a watched fault holds down: not restarted
        self.watch: AlertWatch | None = None
        self.quiet = (0.0, 0.0)  # the quiet period: no fault, orders flowing
        self.watched: list[Watched] = []
        self.first_fault_at = 0.0
        self.screenshot: Path | None = None

    def watch_publishes(self) -> None:
        """Count the first publish (retries 0) of every task id from Celery's own
        `task-sent` events (CELERY_TASK_SEND_SENT_EVENT): the witness that a row is
        published at most twice (after commit, and by the relay). The events travel by
        Redis pub/sub: lost while Redis is down, never invented, so the count is a lower
        bound, and "more than twice" is never a false alarm. A worker's own publishes of
        a task id are left out: retries (retries above 0) and deferrals under the rate
        limit or an open breaker (jobs/dependencies.py: the same attempt again, retries
        still 0, with an ETA; the outbox publishes none with an ETA)."""
        from jobs import app

        def sent(event: dict[str, Any]) -> None:
            if first_publish(event):
                sender = f"{event.get('hostname')} pid {event.get('pid')}"
                when = time.strftime("%H:%M:%S", time.localtime(event.get("timestamp", 0)))
                self.publishes[str(event["uuid"])].append(f"{sender} at {when}")

        while True:
            try:
                with app.connection_for_read() as connection:
                    receiver = app.events.Receiver(connection, handlers={"task-sent": sent})
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:  # Redis restarted under it: listen again
                time.sleep(0.2)

    def prepare(self) -> None:
        """After the stack is up: the operator's admin login, the stock before any order."""
        from django.contrib.auth.models import User

        from shop.models import Product

        User.objects.create_superuser(OPERATOR, "operator@example.com", OPERATOR_PASSWORD)
        self.initial_stock = dict(Product.objects.values_list("sku", "stock"))
        threading.Thread(target=self.watch_publishes, name="task-sent", daemon=True).start()

    # --- load and faults --------------------------------------------------------------

    def card(self, rng: random.Random | None = None) -> str:
        return DECLINED if (rng or self.rng).random() < self.args.declined_share else GOOD

    def place_order(self, card: str) -> tuple[str, str | None]:
        """One order over HTTP, as a careful client places it: one key per order, the
        same key on every retry of it, so a request whose answer was lost (the web process
        died after COMMIT) is never placed twice. The order's reference, or None."""
        body = {
            "email": "chaos@example.com",
            "card_token": card,
            "items": [{"sku": random.choice(SKUS), "quantity": 1}],
        }
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        for _ in range(40):
            try:
                response = httpx.post(
                    self.url("/api/orders/"), json=body, headers=headers, timeout=30
                )
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if response.status_code >= 500:
                time.sleep(0.5)
                continue
            if response.status_code == 201:
                return card, str(response.json()["id"])
            return card, None
        return card, None

    @staticmethod
    def sorted_out(results: list[tuple[str, str | None]]) -> tuple[list[str], list[str], int]:
        """Accepted good cards, accepted declined cards, refused."""
        accepted = [ref for card, ref in results if ref and card == GOOD]
        declined = [ref for card, ref in results if ref and card == DECLINED]
        return accepted, declined, sum(1 for _, ref in results if ref is None)

    def place_orders(self) -> tuple[list[str], list[str], int]:
        cards = [self.card() for _ in range(self.args.orders)]
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            return self.sorted_out(list(pool.map(self.place_order, cards)))

    def trickle(self, stop: threading.Event, results: list[tuple[str, str | None]]) -> None:
        """Orders at a shop's quiet pace (two a second) until `stop`: the work the
        alerts' quiet period and the watched faults need flowing."""
        rng = random.Random(self.args.seed + 1)  # the seeded faults draw from self.rng alone

        def place(card: str) -> None:
            results.append(self.place_order(card))

        with ThreadPoolExecutor(2) as pool:
            while not stop.wait(0.5):
                pool.submit(place, self.card(rng))

    def fault_schedule(self, first_round: bool) -> list[str]:
        """Every chosen fault once per round, in a seeded order. The first round opens,
        while orders still flow, with the kill between a receipt's send and its mark (it
        needs a receipt being sent: after the load, or while the gateway is down, none
        is), the gateway rejecting requests (dead letters for the operator to decide on,
        two faults later, and for the replay step), and the gateway outage (ridden out by
        the retries; the operator's discards ask the gateway just after it)."""
        names = list(self.args.faults)
        self.rng.shuffle(names)
        if first_round:
            first = ("kill_between_send_and_mark", "gateway_rejects", "gateway_outage")
            for position, name in enumerate(first):
                if name in names:
                    names.remove(name)
                    names.insert(position, name)
            if "operator_decisions" in names:
                names.remove("operator_decisions")
                names.insert(min(3, len(names)), "operator_decisions")
        return names

    def inject_faults(self, stop: threading.Event) -> None:
        schedule: list[str] = []
        while not stop.wait(self.args.fault_every):
            if not schedule:
                schedule = self.fault_schedule(first_round=not self.faults)
            name = schedule.pop(0)
            # A fault that needs a moment which did not come (no receipt was being sent)
            # says so and is not counted: it comes round again, and the verdict fails if
            # it never lands.
            if getattr(self, name)() is not False:
                self.faults.append((time.monotonic(), name))  # when it ended

    def wait_for_every_fault(self, timeout: float) -> None:
        """A verdict about faults that never ran would prove nothing about them."""
        deadline = time.monotonic() + timeout
        while self.faults_not_run() and time.monotonic() < deadline:
            time.sleep(1)

    def faults_not_run(self) -> list[str]:
        ran = {name for _, name in self.faults}
        return [name for name in self.args.faults if name not in ran]

    def kill_child(self) -> None:
        """A prefork worker's child SIGKILLed at a random moment (the OOM killer's way).
        (The threads pools of payments and emails have no child: one of their threads
        cannot die alone, so kill_worker stands for their losses.)"""
        with_children = [q for q in QUEUES if self.children(f"worker-{q}")]
        if with_children:
            queue = self.rng.choice(with_children)
            os.kill(self.rng.choice(self.children(f"worker-{queue}")), signal.SIGKILL)

    def kill_worker(self, queue: str = "") -> None:
        """A whole worker SIGKILLed (a lost host): its unacked tasks wait for the
        visibility timeout, the reconciler finds the stuck payments first."""
        queue = queue or self.rng.choice(["payments", "emails"])
        with self.lock:
            proc = self.procs[f"worker-{queue}"]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.worker(queue)

    def supervise(self, stop: threading.Event) -> None:
        """Restart a worker or beat that exits on its own, as systemd or Kubernetes
        would. (Celery 5.7 can exit with "Unrecoverable error" when the broker restarts
        under it; a worker process must always run under a supervisor.)"""
        while not stop.wait(0.5):
            with self.lock:
                supervised = [
                    name
                    for name in self.procs
                    if name.startswith(("worker-", "beat")) and name not in self.held
                ]
                self.exits += self.restart_exited(supervised)

    def probe_liveness(self, stop: threading.Event) -> None:
        """Restart a worker that stops answering pings, as the livenessProbe of
        deploy/k8s/workers.yaml (deploy/bin/worker-alive: `celery inspect ping`) and
        compose's healthcheck would: a worker whose main loop is wedged (seen here: blocked
        reading a broker connection after the broker's faults) consumes nothing and never
        exits, so restarting only what exits is not enough [§9]."""
        from jobs.celery import app, control_connection

        misses: Counter[str] = Counter()
        while not stop.wait(LIVENESS_PERIOD):
            for name in [n for n in list(self.procs) if n.startswith("worker-")]:
                if name in self.held:
                    continue
                queue = name.removeprefix("worker-")
                try:
                    with control_connection() as connection:  # not a pooled one [§10]
                        node = [self.node(queue)]
                        answered = app.control.ping(node, timeout=5, connection=connection)
                except Exception:  # noqa: S112 - the broker is down, not the worker: ask again later
                    continue
                misses[name] = 0 if answered else misses[name] + 1
                if misses[name] < LIVENESS_FAILURES:
                    continue
                with self.lock:
                    proc = self.procs[name]
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        self.exits.append(f"{name} (liveness: {misses[name]} pings unanswered)")
                        self.worker(queue)
                misses[name] = 0

    def kill_mid_charge(self) -> None:
        """The gateway records charges and answers late; the payments children (on
        threads: the whole worker) are SIGKILLed while they wait: charged at the gateway,
        not marked in the shop. The
        retry must find the charge by its idempotency key, not charge again."""
        self.gateway_control(timeout_rate=1, timeout_seconds=3)
        time.sleep(1.0)
        if self.children("worker-payments"):  # prefork: the children die, the worker lives
            self.kill_children("worker-payments")
        else:  # threads: the charges wait in the worker's own process
            self.kill_worker("payments")
        self.gateway_control(timeout_rate=self.args.gateway_timeout_rate, timeout_seconds=17)

    def kill_between_send_and_mark(self) -> bool:
        """The next receipt is written to the mail folder, then the process that sent it
        (a prefork child; on threads the worker itself, which the supervisor restarts) is
        SIGKILLed before the Receipt row is marked sent (deploy/lab_mail.py)."""
        armed, pid_file = self.dir / "mail-trap", self.dir / "mail-trap.pid"
        pid_file.unlink(missing_ok=True)
        armed.touch()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.02)
        armed.unlink(missing_ok=True)
        if not pid_file.exists():
            return False  # no receipt was sent meanwhile: the trap caught nothing
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        self.trapped_mails += 1
        return True

    def kill_web_after_commit(self) -> None:
        """Redis is frozen (SIGSTOP: connections hang, nothing is refused), so checkouts
        commit and answer while each web process's publishing thread hangs in the publish
        with the rows behind it in memory; every web worker is SIGKILLed there. The
        orders exist, their outbox rows are unsent, and the clients whose requests were
        cut off saw errors and retry."""
        redis = self.procs["redis"]
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            self.kill_children("web")  # gunicorn starts new ones
            time.sleep(self.args.outage_seconds)
        finally:
            os.kill(redis.pid, signal.SIGCONT)

    def restart_broker(self) -> None:
        """Redis stopped cleanly and started again from its AOF."""
        self.procs["redis"].terminate()
        self.procs["redis"].wait()
        self.redis()

    def broker_outage(self) -> None:
        """Redis SIGKILLed (up to a second of writes lost: appendfsync everysec), down
        for a few seconds during checkout: the outbox keeps what could not be sent."""
        self.procs["redis"].kill()
        self.procs["redis"].wait()
        time.sleep(self.args.outage_seconds)
        self.redis()

    def kill_web_worker(self) -> None:
        """One gunicorn worker SIGKILLed at a random moment."""
        children = self.children("web")
        if children:
            os.kill(self.rng.choice(children), signal.SIGKILL)  # gunicorn starts another

    def gateway_outage(self) -> None:
        """The gateway answers 503 to every charge for a while: five failures in a row open
        the circuit breaker, and the charges wait (deferred, no retry spent) while one
        probe per cooldown asks; the gateway counts what it received meanwhile."""
        start = time.time()
        self.gateway_control(outage=True)
        time.sleep(self.args.gateway_outage_seconds)
        self.gateway_control(outage=False)
        end = time.time()
        seconds = self.gateway_seconds(start)
        received = sum(r["received"] for r in seconds if start <= r["second"] < math.floor(end))
        self.outages.append((start, end, received))

    def slow_broker(self) -> None:
        """Every packet to and from Redis waits 1.5 s for --outage-seconds: longer than the
        after-commit publish's timeout, so checkouts leave their rows to the relay, which
        works through its backlog on the slow broker (one row per transaction: a run cut
        short republishes one row at most, never its batch)."""
        self.proxy.delay = 1.5
        time.sleep(self.args.outage_seconds)
        self.proxy.delay = 0.0

    def gateway_rejects(self) -> None:
        """The gateway refuses every charge as invalid for a while (a broken integration):
        permanent errors, dead-lettered at once, for the operator to decide on."""
        self.gateway_control(reject_rate=1.0)
        time.sleep(self.args.outage_seconds)
        self.gateway_control(reject_rate=0.0)

    def operator_decisions(self) -> None:
        """An operator works through the dead letters mid-run, as from the admin: replays
        half, discards the other half (a discarded charge cancels its order, the gateway
        asked first; a discarded receipt is abandoned), and cancels one pending order."""
        from jobs.dead_letters import dead_letter_discard, dead_letter_replay
        from jobs.dependencies import operator_call
        from jobs.errors import TransientError
        from jobs.models import DeadLetter
        from shop.models import Order
        from shop.services.orders import order_cancel

        rows = sorted(DeadLetter.objects.filter(status="dead").values_list("pk", flat=True))
        self.rng.shuffle(rows)
        half = len(rows) // 2
        replayed = dead_letter_replay(ids=rows[half:], actor=OPERATOR)
        self.decisions["replayed"] += replayed.done
        self.decisions["refused"] += len(replayed.errors)
        discard = rows[:half]
        for attempt in range(3):
            # A discard asks the gateway first; refused while the gateway cannot be asked
            # (its breaker open, the backlog's turns booked), it says so and changes
            # nothing: the operator tries again a little later, as the message says.
            if attempt:
                time.sleep(5)
            discarded = dead_letter_discard(ids=discard, actor=OPERATOR)
            self.decisions["discarded"] += discarded.done
            self.decisions["discards refused for now"] += len(discarded.errors)
            if not discarded.errors:
                break
            discard = list(
                DeadLetter.objects.filter(pk__in=discard, status="dead").values_list(
                    "pk", flat=True
                )
            )
        pending = sorted(Order.objects.filter(status="pending").values_list("pk", flat=True))
        if pending:
            try:
                with operator_call():  # as the admin's cancel action
                    outcome = str(
                        order_cancel(
                            order_id=self.rng.choice(pending[-50:]),
                            actor=OPERATOR,
                            message="Cancelled by the shop.",
                        )
                    )
            except Exception as exc:  # the gateway cannot be asked now: nothing changed
                why = exc.explain() if isinstance(exc, TransientError) else repr(exc)
                outcome = f"refused ({why})"
            self.decisions[f"order cancel: {outcome}"] += 1

    def stale_product_edit(self) -> None:
        """The operator opens a product's admin form, orders reserve its stock meanwhile,
        and the form is saved as it was loaded: every reservation must survive."""
        from shop.models import Product

        product_id = Product.objects.get(sku=self.rng.choice(SKUS)).pk
        try:
            with AdminSession(self.url(""), OPERATOR, OPERATOR_PASSWORD) as admin:
                fields = admin.product_form(product_id)
                time.sleep(2.0)
                admin.product_save(product_id, fields)
        except (httpx.HTTPError, RuntimeError) as exc:  # a web fault at the same moment
            print(f"chaos: stale product edit not saved: {exc}", flush=True)
            return
        self.stale_edits += 1

    def duplicate_delivery(self) -> None:
        """The newest outbox row published twice at the same moment (the relay and the
        after-commit publisher both sent it): two live copies of one task, charged once,
        one mail."""
        from jobs import outbox
        from jobs.models import OutboxMessage

        task = self.rng.choice([CHARGE, RECEIPT])
        row = OutboxMessage.objects.filter(task_name=task).order_by("-id").first()
        if row is None:
            return
        try:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda _: outbox._send(row), range(2)))
        except Exception as exc:  # the broker may be down at this moment
            print(f"chaos: duplicate delivery not sent: {exc!r}", flush=True)
            return
        self.duplicated[str(row.task_id)] += 1

    # --- alerts: a real Prometheus watching the lab (deploy/lab_alerts.py) ---------------

    def start_watching(self) -> None:
        self.prometheus = start_prometheus(
            self.dir / "prometheus", free_port(), f"127.0.0.1:{self.web_port}"
        )
        wait_for("Prometheus scraping the web", self.prometheus.targets_up, 60)
        self.watch = AlertWatch(self.prometheus).start()
        print(f"chaos: Prometheus at {self.prometheus.url}{ALERTS_PAGE}", flush=True)

    def wait_alerts_clear(self, timeout: float, names: set[str] | None = None) -> None:
        """Until no alert (of `names`) is pending or firing, as read after this call."""
        assert self.watch is not None
        deadline, read = time.monotonic() + timeout, self.watch.polls
        while (self.watch.polls == read or self.watch.active(names)) and (
            time.monotonic() < deadline
        ):
            time.sleep(1)

    def quiet_period(self) -> list[tuple[str, str | None]]:
        """Orders at a quiet pace and no fault, once the alerts of the lab's start (no
        canary run yet) are gone: no alert may fire."""
        self.wait_alerts_clear(timeout=90)
        results: list[tuple[str, str | None]] = []
        stop = threading.Event()
        thread = threading.Thread(target=self.trickle, args=(stop, results))
        start = time.monotonic()
        thread.start()
        time.sleep(self.args.quiet_seconds)
        stop.set()
        thread.join()
        self.quiet = (start, time.monotonic())
        return results

    def hold_worker_down(self) -> Callable[[], None]:
        self.held.add("worker-emails")
        with self.lock:
            proc = self.procs["worker-emails"]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

        def recover() -> None:
            with self.lock:
                self.worker("emails")
                self.held.discard("worker-emails")

        return recover

    def hold_stuck_queue(self) -> Callable[[], None]:
        with self.lock:
            self.held.add("worker-payments")
            proc = self.procs["worker-payments"]
            os.killpg(proc.pid, signal.SIGSTOP)

        def recover() -> None:
            with self.lock:
                os.killpg(proc.pid, signal.SIGCONT)
                self.held.discard("worker-payments")

        return recover

    def hold_broker_down(self) -> Callable[[], None]:
        self.procs["redis"].kill()
        self.procs["redis"].wait()
        return self.redis

    def hold_gateway_down(self) -> Callable[[], None]:
        self.gateway_control(outage=True)
        return lambda: self.gateway_control(outage=False)

    def watched_faults(self) -> list[tuple[str, str | None]]:
        """Each watched fault, with orders flowing: held until its alerts fire (or their
        bound passes), then undone, and its alerts watched until they resolve."""
        assert self.watch is not None
        results: list[tuple[str, str | None]] = []
        stop = threading.Event()
        thread = threading.Thread(target=self.trickle, args=(stop, results))
        thread.start()
        try:
            for name in self.args.watch:
                what, expected = WATCHED[name]
                fault = Watched(name, what, expected)
                # From a consumed, healthy stack: every worker back (a worker restarted
                # after an earlier fault), every canary fresh, this fault's alerts gone.
                healthy = {"JobsWorkerOffline", "JobsCanaryStale"} | {a for a, _ in expected}
                self.wait_alerts_clear(RESOLVE_BOUND + 30, names=healthy)
                fault.started = time.monotonic()
                recover = getattr(self, f"hold_{name}")()
                try:
                    bound = max(fire_bound(alert, labels) for alert, labels in expected)
                    while time.monotonic() < fault.started + bound + 5 and not all(
                        self.watch.first_firing(fault.started, alert, **labels)
                        for alert, labels in expected
                    ):
                        time.sleep(1)
                    if self.screenshot is None and self.watch.fired(fault.started):
                        path = self.dir / "prometheus-alert-firing.png"
                        if screenshot(f"{self.prometheus.url}{ALERTS_PAGE}", path):
                            self.screenshot = path
                finally:  # never leave a worker held or frozen, whatever happened
                    recover()
                fault.recovered = time.monotonic()
                self.watched.append(fault)
                self.wait_alerts_clear(RESOLVE_BOUND + 5, names={a for a, _ in expected})
                fired = self.watch.started_firing(fault.started)
                print(f"chaos: watched {name}: fired {', '.join(fired) or 'nothing'}", flush=True)
        finally:
            stop.set()
            thread.join()
        return results

    def alert_rows(self, *, after_replay: bool) -> list[tuple[str, object, bool]]:
        if self.watch is None:
            return []
        if not after_replay:  # the quiet period's line, and what the mixed faults fired
            during = sorted({e.name for e in self.watch.fired(self.first_fault_at)})
            quiet = [quiet_row(self.watch, self.quiet)] if self.quiet[1] else []
            return [
                *quiet,
                ("alerts fired during the mixed faults", ", ".join(during) or "none", True),
            ]
        rows = watched_rows(self.watch, self.watched)
        if self.screenshot is not None:
            rows.append(("Prometheus's alerts page, an alert firing", self.screenshot, True))
        return rows

    # --- the verdict ----------------------------------------------------------------------

    def settle(self, accepted: list[str], declined: list[str], since: float) -> float:
        """Wait (bounded) until every order settled; seconds from `since` until then."""
        deadline = time.monotonic() + self.args.settle_timeout
        while time.monotonic() < deadline:
            if not self.unsettled(accepted, declined):
                break
            time.sleep(1)
        return time.monotonic() - since

    def dead_lettered(self) -> set[str]:
        """References of orders whose payment or receipt task is a dead letter now."""
        from jobs.models import DeadLetter
        from shop.models import Order

        rows = DeadLetter.objects.filter(status="dead").values_list("task_name", "args")
        payments = {a[0] for t, a in rows if t == "shop.tasks.payments.charge_payment"}
        orders = {a[0] for t, a in rows if t == "shop.tasks.emails.send_receipt"}
        return {
            str(ref)
            for ref in Order.objects.filter(pk__in=orders).values_list("reference", flat=True)
        } | {
            str(ref)
            for ref in Order.objects.filter(payment__pk__in=payments).values_list(
                "reference", flat=True
            )
        }

    def unsettled(self, accepted: list[str], declined: list[str]) -> list[str]:
        """Orders not yet at an end: accepted ones neither receipted (or their receipt
        abandoned by the operator) nor cancelled, declined ones not failed (or cancelled),
        and neither waiting on a dead letter."""
        from shop.models import Order

        def references(**where: object) -> set[str]:
            return set(map(str, Order.objects.filter(**where).values_list("reference", flat=True)))

        done = references(receipt__status__in=["sent", "abandoned"]) | references(
            status="cancelled"
        )
        failed = references(status__in=["failed", "cancelled"])
        dead = self.dead_lettered()
        return [r for r in accepted if r not in done and r not in dead] + [
            r for r in declined if r not in failed and r not in dead
        ]

    def outcomes(self, ledger: list[dict[str, Any]]) -> list[tuple[str, object, bool]]:
        """The verdict's rows about the roads out of a failure."""
        from django.db.models import Sum
        from django.utils import timezone

        from jobs.models import DeadLetter, OutboxMessage
        from shop.models import Order, OrderLine, Product
        from shop.services.payments import charge_description

        reserved = dict(
            OrderLine.objects.filter(order__status__in=["paid", "pending"])
            .values("product__sku")
            .annotate(units=Sum("quantity"))
            .values_list("product__sku", "units")
        )
        stock = dict(Product.objects.values_list("sku", "stock"))
        unbalanced = [
            sku
            for sku, initial in self.initial_stock.items()
            if initial != stock[sku] + reserved.get(sku, 0)
        ]
        charged = Counter(c["description"] for c in ledger if c["status"] == "succeeded")
        cancelled = list(Order.objects.filter(status="cancelled").select_related("payment"))
        charged_cancelled = [o.pk for o in cancelled if charged[charge_description(o)]]
        waiting = {
            args[0]
            for args in DeadLetter.objects.filter(status="dead", task_name=CHARGE).values_list(
                "args", flat=True
            )
        }
        pending = Order.objects.filter(status="pending").select_related("payment")
        ownerless = [o.pk for o in pending if o.payment.pk not in waiting]
        deadline = timezone.now() - timedelta(seconds=self.args.payment_deadline + 60)
        overdue = pending.filter(created_at__lt=deadline).count()
        rows = list(map(str, OutboxMessage.objects.values_list("task_id", flat=True)))
        over = over_published(rows, self.publishes, self.duplicated)
        seen = sum(1 for row in rows if self.publishes.get(row))
        client = redis.Redis(port=self.redis_port)
        guard_keys = sum(1 for _ in client.scan_iter("jobs:deliveries:*", count=1000))
        kills = sum(1 for _, name in self.faults if name.startswith("kill"))
        chosen, missing = list(self.args.faults), self.faults_not_run()
        key_bound = 50 + 10 * kills  # a killed delivery leaves its count until its TTL
        limit = self.args.gateway_rate_limit
        traffic = self.gateway_seconds(0)
        busiest = max((r["received"] for r in traffic), default=0)
        received = sum(r["received"] for r in traffic)
        refused = sum(r["refused"] for r in traffic)
        # Five failures open the breaker; then a probe per cooldown; plus what a second
        # of the limit admitted before the fifth failure was counted.
        outage_bound = 5 + math.ceil(self.args.gateway_outage_seconds / BREAKER_COOLDOWN) + limit
        outage_calls = [calls for _, _, calls in self.outages]
        return [
            (
                # The shop's limiter runs at 0.95 of the limit (every process of the
                # stack and the lab's own: Stack.client_env): that margin is the
                # tolerance for calls that reach the gateway a moment after their count.
                f"gateway never above its limit ({limit}/s, the shop's 0.95 of it; "
                "the gateway's count, busiest second) / refused (429)",
                f"{busiest} calls / {refused} of {received}",
                busiest <= limit,
            ),
            (
                f"gateway calls during each outage (breaker: probes only; bound {outage_bound})",
                ", ".join(map(str, outage_calls)) or "no outage",
                all(calls <= outage_bound for calls in outage_calls),
            ),
            (
                "stock conserved (initial = now + units in paid and pending orders)",
                ", ".join(unbalanced) or f"every product ({self.stale_edits} stale admin saves)",
                not unbalanced,
            ),
            (
                "cancelled orders (operator, discarded charge, deadline) / charged",
                f"{len(cancelled)} / {len(charged_cancelled)}",
                not charged_cancelled,
            ),
            (
                "orders pending, no dead letter waiting for an operator",
                len(ownerless),
                not ownerless,
            ),
            ("orders pending past their payment deadline", overdue, overdue == 0),
            (
                "poison-guard keys in the broker (bound: 50 + 10 per kill)",
                f"{guard_keys} (bound {key_bound})",
                guard_keys <= key_bound,
            ),
            (
                "outbox rows published more than twice (Celery's task-sent events)",
                f"{len(over)} of {len(rows)} ({seen} seen published)"
                + "".join(f"; {row} by {', '.join(by)}" for row, by in over.items()),
                not over,
            ),
            (
                "faults that ran (each chosen one at least once)",
                f"{len(chosen) - len(missing)} of {len(chosen)}"
                + (f", never: {', '.join(missing)}" if missing else ""),
                not missing,
            ),
            (
                "operator decisions (dead letters / orders)",
                ", ".join(f"{n} {what}" for what, n in sorted(self.decisions.items())) or "none",
                bool(self.decisions) or "operator_decisions" not in chosen,
            ),
            (
                # Each charged once and one mail: judged by the charged-twice and
                # duplicate-email rows; here, that the fault did make duplicates.
                "outbox rows published twice at once (each charged once, one mail)",
                sum(self.duplicated.values()),
                bool(self.duplicated) or "duplicate_delivery" not in chosen,
            ),
        ]

    def verdict(
        self,
        accepted: list[str],
        declined: list[str],
        refused: int,
        settle: float,
        *,
        after_replay: bool = False,
    ) -> bool:
        from jobs.models import DeadLetter
        from shop.models import Order, Receipt
        from shop.services.payments import charge_description

        orders = {str(o.reference): o for o in Order.objects.select_related("payment")}
        ledger = httpx.get(self.gw("/v1/charges"), timeout=30).json()["charges"]
        charges = Counter(c["description"] for c in ledger if c["status"] == "succeeded")
        mails = Counter(
            line.split(":", 1)[1].strip()
            for path in (self.dir / "mail").glob("*.log")
            for line in path.read_text().splitlines()
            if line.lower().startswith("message-id:")
        )
        paid = [orders[r] for r in accepted if orders[r].status == "paid"]
        dead = self.dead_lettered()
        lost = [r for r in self.unsettled(accepted, []) if r not in dead]
        waiting = [r for r in accepted if r in dead]  # good cards only
        doubles = [o.pk for o in paid if charges[charge_description(o)] > 1]
        uncharged = [o.pk for o in paid if charges[charge_description(o)] == 0]
        # A decline is the order's final state (failed), not a dead letter. A declined
        # card caught by a gateway outage first runs out of retries, and waits for the
        # replay, which then declines it.
        permanent = DeadLetter.objects.filter(exception_class__endswith=".CardDeclined").count()
        declined_final = [r for r in declined if orders[r].status in ("failed", "cancelled")]
        declined_waiting = [r for r in declined if r in dead and r not in declined_final]
        declined_ok = (
            len(declined_final) + (0 if after_replay else len(declined_waiting)) == len(declined)
            and permanent == 0
        )
        exhausted = DeadLetter.objects.filter(reason__in=REPLAYED_REASONS).count()
        duplicates = sum(n - 1 for n in mails.values() if n > 1)
        receipts = Receipt.objects.count()
        injected = Counter(name for _, name in self.faults)
        total = len(accepted) + len(declined)
        rows = [
            ("orders accepted (201) / refused", f"{total} / {refused}", True),
            (
                "orders in the database (client retries placed none twice)",
                len(orders),
                len(orders) == total,
            ),
            ("lost (accepted, no receipt, no dead letter)", len(lost), not lost),
            (
                "accepted orders waiting in the dead letters (replayable)",
                len(waiting),
                not (after_replay and waiting),
            ),
            ("paid orders charged twice (gateway ledger)", len(doubles), not doubles),
            ("paid orders with no charge (gateway ledger)", len(uncharged), not uncharged),
            (
                "receipt rows (one per paid order)",
                f"{receipts} for {len(paid)} paid",
                receipts == len(paid),
            ),
            (
                "duplicate emails (same Message-ID, a provider drops them)",
                f"{duplicates} ({self.trapped_mails} kills between send and mark)",
                True,
            ),
            (
                "declined: failed, no dead letter",
                f"{len(declined_final)} of {len(declined)} ({len(declined_waiting)} waiting)",
                declined_ok,
            ),
            (f"dead letters {', '.join(REPLAYED_REASONS)} (all time)", exhausted, True),
            (
                "processes restarted (exited on their own, or wedged: liveness probe)",
                ", ".join(self.exits) or "none",
                True,
            ),
            ("faults injected", ", ".join(f"{n} {f}" for f, n in injected.items()) or "none", True),
            *self.outcomes(ledger),
            *self.alert_rows(after_replay=after_replay),
            (
                "time to settle after the replay (and the watched faults)"
                if after_replay
                else "time to settle after the last fault",
                f"{settle:.0f} s",
                True,
            ),
        ]
        width = max(len(r[0]) for r in rows)
        print(
            "\n"
            + "\n".join(
                f"{'ok ' if ok else 'BAD'} {name:<{width}}  {value}" for name, value, ok in rows
            ),
            flush=True,
        )
        name = "verdict-after-replay.json" if after_replay else "verdict.json"
        (self.dir / name).write_text(
            json.dumps({name: str(value) for name, value, _ in rows}, indent=2)
        )
        return all(ok for _, _, ok in rows)

    def replay(self) -> None:
        """The operator's fix: the gateway works again, and the dead letters whose cause
        was the environment (not the job) are replayed."""
        self.gateway_control(outage=False, failure_rate=0, timeout_rate=0)
        print("chaos: gateway fixed")
        for reason in REPLAYED_REASONS:
            result = subprocess.run(
                [sys.executable, "manage.py", "dlq", "replay", "--reason", reason],
                cwd=BASE_DIR,
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"chaos: dlq replay --reason {reason}: {result.stdout.strip()}")


# Out of retries while the gateway was down, killed once too often, or refused while the
# gateway rejected every request: the job is fine, the environment was not.
# The lab's liveness probe: a worker that misses this many pings in a row, one every
# period, is restarted (Kubernetes: periodSeconds 60, failureThreshold 3; shorter here).
LIVENESS_PERIOD, LIVENESS_FAILURES = 10.0, 3
REPLAYED_REASONS = ["retries_exhausted", "worker_lost", "permanent_error"]
FAULTS = [
    "kill_child",
    "kill_worker",
    "kill_mid_charge",
    "kill_between_send_and_mark",
    "kill_web_after_commit",
    "kill_web_worker",
    "restart_broker",
    "broker_outage",
    "gateway_outage",
    "gateway_rejects",
    "operator_decisions",
    "stale_product_edit",
    "duplicate_delivery",
    "slow_broker",
]


# The watched faults: what each is, and the alerts (name, labels) it must fire.
WATCHED: dict[str, tuple[str, list[tuple[str, dict[str, str]]]]] = {
    "worker_down": (
        "the emails worker killed and kept down",
        [("JobsWorkerOffline", {"queue": "emails"}), ("JobsCanaryStale", {"queue": "emails"})],
    ),
    "stuck_queue": (
        "the payments worker frozen (SIGSTOP) under orders",
        [("JobsQueueTooOld", {"queue": "payments"})],
    ),
    "gateway_down": (
        "the gateway answering 503 under orders",
        [("JobsDependencyCircuitOpen", {"dependency": "gateway"})],
    ),
    # Last: after Redis comes back, workers can wedge until the liveness probe restarts
    # them (jobs/NOTES.md §9).
    "broker_down": ("Redis down under orders", [("JobsOutboxBacklog", {})]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--declined-share", type=float, default=0.05)
    parser.add_argument("--fault-every", type=float, default=4.0, help="seconds between faults")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, from: {', '.join(FAULTS)} (default: all)",
    )
    parser.add_argument("--outage-seconds", type=float, default=5.0)
    parser.add_argument("--gateway-outage-seconds", type=float, default=15.0)
    parser.add_argument(
        "--chaos-seconds", type=float, default=30.0, help="faults go on this long after the load"
    )
    parser.add_argument("--gateway-failure-rate", type=float, default=0.05)
    parser.add_argument("--gateway-timeout-rate", type=float, default=0.01)
    parser.add_argument(
        "--gateway-rate-limit", type=int, default=40, help="calls a second it accepts (429 beyond)"
    )
    parser.add_argument("--settle-timeout", type=float, default=600.0)
    parser.add_argument(
        "--fault-round-timeout",
        type=float,
        default=600.0,
        help="after the load and --chaos-seconds, wait at most this long for every chosen"
        " fault to have run once",
    )
    parser.add_argument(
        "--payment-deadline",
        type=float,
        default=180.0,
        help="seconds an unpaid order waits before it is cancelled (ORDER_PAYMENT_DEADLINE)",
    )
    parser.add_argument("--no-replay", action="store_true", help="stop after the first verdict")
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=40.0,
        help="orders and no fault before the faults: no alert may fire (0: none; needs"
        " Prometheus: not with --watch none)",
    )
    parser.add_argument(
        "--watch",
        default=",".join(WATCHED),
        help="faults held after the replay until their alerts fire, comma-separated, from:"
        f" {', '.join(WATCHED)} (default: all; 'none': no Prometheus, no quiet period)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "CHAOS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop_chaos"
        ),
    )
    args = parser.parse_args(argv)
    if args.orders < 1 or not 0 <= args.declined_share <= 1:
        parser.error("--orders must be positive and --declined-share within 0..1")
    args.faults = choose(parser, args.faults, FAULTS, "fault")
    args.watch = [] if args.watch == "none" else choose(parser, args.watch, list(WATCHED), "fault")
    if args.quiet_seconds < 0:
        parser.error("--quiet-seconds must not be negative")
    return args


def main() -> int:
    args = parse_args()
    if args.watch and shutil.which(BINARY) is None:
        print(f"chaos: {MISSING}; or run without Prometheus: --watch none")
        return 2
    lab = Lab(args)
    print(f"chaos: lab in {lab.dir}; {args.orders} orders, seed {args.seed}", flush=True)
    supervisor_stop, stop = threading.Event(), threading.Event()
    supervisor = threading.Thread(target=lab.supervise, args=(supervisor_stop,))
    liveness = threading.Thread(target=lab.probe_liveness, args=(supervisor_stop,), daemon=True)
    try:
        lab.start()
        lab.setup_django()
        lab.prepare()
        supervisor.start()
        liveness.start()
        quiet: list[tuple[str, str | None]] = []
        if args.watch:  # Prometheus, and the quiet period it judges
            lab.start_watching()
            if args.quiet_seconds:
                print(f"chaos: quiet period, {args.quiet_seconds:.0f} s", flush=True)
                quiet = lab.quiet_period()
        lab.first_fault_at = time.monotonic()
        chaos = threading.Thread(target=lab.inject_faults, args=(stop,))
        chaos.start()
        accepted, declined, refused = lab.place_orders()
        more = lab.sorted_out(quiet)
        accepted, declined, refused = accepted + more[0], declined + more[1], refused + more[2]
        print(
            f"chaos: load done; faults go on for {args.chaos_seconds:.0f} s, and until each"
            " chosen fault ran once",
            flush=True,
        )
        time.sleep(args.chaos_seconds)
        lab.wait_for_every_fault(timeout=args.fault_round_timeout)
        stop.set()
        chaos.join()
        print(f"chaos: {len(lab.faults)} fault(s) injected; settling...", flush=True)
        last_fault = lab.faults[-1][0] if lab.faults else time.monotonic()
        settle = lab.settle(accepted, declined, since=last_fault)
        ok = lab.verdict(accepted, declined, refused, settle)
        if not args.no_replay:
            replayed_at = time.monotonic()
            lab.replay()
            if args.watch:
                print(f"chaos: watched faults: {', '.join(args.watch)}", flush=True)
                more = lab.sorted_out(lab.watched_faults())
                accepted, declined = accepted + more[0], declined + more[1]
                refused += more[2]
                replayed_at = time.monotonic()  # settling counts from the last watched fault
            settle = lab.settle(accepted, declined, since=replayed_at)
            ok = lab.verdict(accepted, declined, refused, settle, after_replay=True) and ok
    finally:
        supervisor_stop.set()
        if supervisor.is_alive():
            supervisor.join()
        if getattr(lab, "prometheus", None) is not None:
            lab.prometheus.stop()
        lab.stop()
        lab.proxy.stop()
    print("\nchaos: every invariant holds" if ok else "\nchaos: INVARIANT BROKEN (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
