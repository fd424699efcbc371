"""The benchmark's stack and its levers: pause and resume a queue's consumers, purge a
queue, wait for work to drain, sample memory, and place orders over HTTP."""

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.bench.cpu import CpuGroups
from deploy.bench.load import Request, Run, load, post_json
from deploy.stack import QUEUES, Stack, children, wait_for

# kombu keeps each queue as one Redis list per priority step: name, name\x06\x163, ...
_PRIORITY_LISTS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
ORDER_BODY = json.dumps(
    {
        "email": "bench@example.com",
        "card_token": "tok_visa",
        "items": [{"sku": "MUG-001", "quantity": 1}, {"sku": "TEE-002", "quantity": 2}],
    }
).encode()
NAIVE = ("payments", "emails")  # the queues the naive pipeline's own workers consume


class Bench(Stack):
    """The shop's full stack (PostgreSQL, AOF Redis, gateway at latency 0, gunicorn with
    `--web-workers` processes, one worker per queue, beat); during scenario 6, a second,
    naive worker for `payments` and `emails` (``naive_workers()``)."""

    def __init__(
        self, *, database_url: str, clients: int, web_workers: int, web_threads: int
    ) -> None:
        super().__init__(
            prefix="bench-",
            database_url=database_url,
            env={
                "LOG_LEVEL": "INFO",  # as in production: one line per job transition
                "LOG_FORMAT": "json",  # the payments worker's `started` lines give queue waits
                # The bench leaves orders unpaid on purpose (queues purged after a scenario
                # that pauses the workers): the reconciler must not take them up mid-run.
                "RECONCILE_INTERVAL": "86400",
                # A mail server's latency, set per run (scenario 8): deploy/bench/mail.py.
                "EMAIL_BACKEND": "deploy.bench.mail.LatencyFileBackend",
                # Speed without a rate limit; scenario 11 sets one (deploy/bench/limits.py).
                "PAYMENT_GATEWAY_RATE_LIMIT": "0",
                "MAIL_RATE_LIMIT": "0",
            },
            wsgi="deploy.bench.web:application",
            web_workers=web_workers,
            web_threads=web_threads,
            worker_args=("-I", "deploy.bench.tasks"),
        )
        self.clients = clients
        self.cpu = CpuGroups(self.dir.name)
        self.peak_rss: dict[str, int] = {}  # role -> KiB
        self._sampling = threading.Event()
        self._client: Any = None

    def start(self, *, beat: bool = True) -> None:
        super().start(beat=beat)
        self.setup_django()
        # This process enqueues through the outbox too (scenario 4): it logs as the web
        # does, to a file of its own instead of the terminal.
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream((self.dir / "bench.log").open("a"))
        from shop.models import Product

        Product.objects.update(stock=10**9)  # the benchmark never runs out of stock
        nodes = [self.node(q) for q in QUEUES]
        wait_for("the workers", lambda: len(self.ping(nodes)) == len(nodes), 120)
        threading.Thread(target=self._sample_rss, daemon=True).start()

    @contextmanager
    def naive_workers(self) -> Iterator[None]:
        """The naive pipeline's own workers for `payments` and `emails` (prefetch 4, early
        acks), their consumers paused until it runs; stopped afterwards. Left running,
        each of their idle threads kept the database connection of its last task (Django
        closes one only when a task begins or ends), and those 24 connections left the
        four payments workers of scenario 11 short of PostgreSQL's max_connections:
        "too many clients", charges retried, a third to a half of the limit unused."""
        names = [f"naive-{queue}" for queue in NAIVE]
        for queue, name in zip(NAIVE, names, strict=True):
            self.worker(queue, "--prefetch-multiplier", "4", name=name)
        try:
            nodes = [self.node(name) for name in names]
            wait_for("the naive workers", lambda: len(self.ping(nodes)) == len(nodes), 120)
            self.pause(*NAIVE, naive=True)
            yield
        finally:
            for name in names:
                self.stop_process(f"worker-{name}")
                del self.procs[f"worker-{name}"]

    def stop(self) -> None:
        self._sampling.set()
        super().stop()
        self.cpu.close()

    def spawn(self, name: str, *command: str) -> None:
        """Each process in the CPU group its Deployment would have (deploy/bench/cpu.py)."""
        super().spawn(name, *command)
        self.cpu.place(name, self.procs[name].pid)

    # --- consumers and queues ------------------------------------------------------------

    def ping(self, nodes: list[str]) -> list[Any]:
        from jobs.celery import app, control_connection

        with control_connection() as connection:  # not a pooled one (jobs/NOTES.md §10)
            return list(app.control.ping(nodes, timeout=1.0, connection=connection))

    def _control(self, command: str, queues: Iterable[str], naive: bool) -> None:
        from jobs.celery import app, control_connection

        for queue in queues:
            node = self.node(f"naive-{queue}" if naive else queue)
            with control_connection() as connection:  # not a pooled one (jobs/NOTES.md §10)
                replies = app.control.broadcast(
                    command,
                    arguments={"queue": queue},
                    destination=[node],
                    reply=True,
                    timeout=5,
                    connection=connection,
                )
            if not replies:
                raise SystemExit(f"bench: {node} did not answer {command}")

    def pause(self, *queues: str, naive: bool = False) -> None:
        """Stop consuming: messages published to these queues wait in Redis."""
        self._control("cancel_consumer", queues, naive)

    def resume(self, *queues: str, naive: bool = False) -> None:
        self._control("add_consumer", queues, naive)

    @property
    def client(self) -> Any:
        """A client of the stack's Redis (redis-py reconnects after a restart)."""
        import redis

        if self._client is None:
            self._client = redis.Redis(port=self.redis_port, socket_timeout=5)
        return self._client

    def depth(self, *queues: str) -> int:
        pipe = self.client.pipeline()
        for queue in queues:
            for suffix in _PRIORITY_LISTS:
                pipe.llen(queue + suffix)
        return int(sum(pipe.execute()))

    def unacked(self) -> int:
        return int(self.client.hlen("unacked"))

    def purge(self, *queues: str) -> None:
        self.client.delete(*(q + s for q in queues for s in _PRIORITY_LISTS))

    def idle(self, *queues: str) -> bool:
        return self.depth(*queues) == 0 and self.unacked() == 0

    def restart_workers(self, *queues: str, options: tuple[str, ...] = ()) -> None:
        """Start these queues' workers anew with `options` after the Procfile's (a pool:
        `-P threads -c 32`), and wait until they answer."""
        for queue in queues:
            self.stop_process(f"worker-{queue}")
            self.worker(queue, *options)
        nodes = [self.node(queue) for queue in queues]
        wait_for("the restarted workers", lambda: len(self.ping(nodes)) == len(nodes), 120)

    def latencies(self, *, gateway_ms: int, jitter_ms: int = 0, mail_ms: int = 0) -> None:
        """What the gateway and the mail server take to answer, from now on."""
        self.gateway_control(latency_ms=gateway_ms, latency_jitter_ms=jitter_ms)
        (self.dir / "mail-latency-ms").write_text(str(mail_ms))

    # --- load ----------------------------------------------------------------------------

    def request(self, path: str, body: bytes = ORDER_BODY, *, idempotent: bool = True) -> Request:
        return post_json("127.0.0.1", self.web_port, path, body, idempotent=idempotent)

    def load(self, request: Request, seconds: float, limit: int | None = None) -> Run:
        return load(
            "127.0.0.1", self.web_port, request, clients=self.clients, seconds=seconds, limit=limit
        )

    def place_orders(self, count: int) -> tuple[int, int]:
        """Place `count` orders over HTTP; (first order id, how many were accepted)."""
        from shop.models import Order

        first = (Order.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1
        run = self.load(self.request("/api/orders/"), seconds=600, limit=count)
        if run.errors:
            raise SystemExit(f"bench: {run.errors} order(s) refused: {run.statuses}")
        return first, run.ok

    def writes(self) -> int:
        """The next transaction id PostgreSQL will assign: it assigns one to each
        transaction that writes (read-only ones get none), in every database of the
        server, so the difference over a run is that run's writing transactions."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            return int(cursor.fetchone()[0])

    def receipts_sent(self, first_order: int) -> int:
        from shop.models import Receipt

        return Receipt.objects.filter(order_id__gte=first_order, status="sent").count()

    # --- memory --------------------------------------------------------------------------

    def _sample_rss(self) -> None:
        """Peak resident memory (VmHWM) of every web worker and worker pool child."""
        while not self._sampling.wait(0.5):
            for name, proc in list(self.procs.items()):
                if name != "web" and not name.startswith("worker-"):
                    continue
                role = "web worker" if name == "web" else f"{name[7:]} child"
                for pid in children(proc.pid):
                    kib = _vm_hwm(pid)
                    if kib > self.peak_rss.get(role, 0):
                        self.peak_rss[role] = kib


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def wait_until(what: str, done: Callable[[], bool], timeout: float, every: float = 0.02) -> float:
    """Poll `done`; the monotonic time at which it first held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen in {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic()
