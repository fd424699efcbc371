"""The tests' helpers, in one module: test modules import them from here, never from one
another or from a conftest (conftest files hold fixtures, used as fixtures).

Real processes for the tests (a private Redis, the payment gateway, Celery workers,
`make run`'s stack) run on free ports and temporary folders; the machine's shared
services are never stopped or flushed. Playwright is imported by the browser helpers
that use it, so this module imports without it.
"""

import json
import os
import posixpath
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import redis
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from jobs import outbox
from jobs.base import ReliableTask
from jobs.celery import app, control_connection, queue_of
from jobs.models import DeadLetter
from jobs.testing import assert_nothing_enqueued
from shop.models import Order, Payment, Product

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "deploy" / "bin"  # how every role starts, here as in make run and the images
# The shop's queues, as its settings declare them (once: CELERY_TASK_QUEUES).
QUEUES = tuple(queue.name for queue in settings.CELERY_TASK_QUEUES)
# kombu keeps each queue as one Redis list per priority step: name, name\x06\x163, ...
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


# --- Processes: ports, environments, scripts, waiting --------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def role_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (this process's by default) with what the start scripts of deploy/bin/ need:
    this virtualenv's commands first on PATH (as the image has them), loopback addresses,
    and the tests' one metrics folder left as it is (the test process reads it too)."""
    env = dict(os.environ if env is None else env)
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "LISTEN_HOST": "127.0.0.1",
        "METRICS_DIR_SHARED": "1",
    }


def run_script(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """A deploy/bin script run to its end (a refusal, a usage error), its output as text."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def run_concurrently(action: Callable[[], Any], times: int = 2) -> list[BaseException]:
    """Run `action` in `times` threads released together; return what they raised.

    Each thread has its own database connection (closed at the end), as two workers would.
    """
    from django.db import connection

    errors: list[BaseException] = []
    barrier = threading.Barrier(times)

    def run() -> None:
        barrier.wait()
        try:
            action()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def run_module(
    module: str, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` from the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- The tests' own servers: a private Redis, the payment gateway --------------------------


class _Server:
    """A server process of the tests, stopped with SIGTERM."""

    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class RedisServer(_Server):
    """A private redis-server on a free port (no persistence unless asked)."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), *self.extra]
        args += ["--appenddirname", "aof"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=10, what=f"redis-server on {self.port}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server on {self.port} exited ({self.proc.returncode})")
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def crash(self) -> None:
        """SIGKILL: no shutdown save, no goodbye; only what is on disk survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @contextmanager
    def down(self) -> Iterator[None]:
        """The broker stopped for the block (connections refused), started again after it
        whatever the block raised: an outage, and the recovery every test needs."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP, then SIGCONT: meanwhile the server accepts connections and reads
        nothing, answers nothing (a hung or partitioned broker, not a refused one)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def aof_written(self) -> bool:
        """Whether everything Redis has accepted is written to its append-only file: what
        survives a crash of the process (fsync matters only to a crash of the machine).
        With `appendfsync everysec` Redis may hold writes back while an fsync runs."""
        info = self.client().info("persistence")
        return bool(info["aof_enabled"]) and info["aof_buffer_length"] == 0

    def queue_lengths(self) -> dict[str, int]:
        """Each queue's messages, once this process's outbox publishing thread has tried
        every row committed so far (it publishes them a moment after their commit)."""
        assert outbox.wait_published()
        client = self.client()
        return {q: sum(client.llen(q + s) for s in _PRIORITY_SUFFIXES) for q in QUEUES}

    def unacked(self) -> int:
        return int(self.client().hlen("unacked"))

    def restore_unacked(self) -> int:
        """Put delivered-but-unacked messages back on their queues, as a worker's sweep
        does once the visibility timeout has passed; here that clock is set to zero."""
        from kombu import Connection

        eligible = int(self.client().zcard("unacked_index"))  # all of them, at timeout 0
        with Connection(self.url, transport_options={"visibility_timeout": 0}) as conn:
            conn.default_channel.qos.restore_visible(num=1000, interval=1)
        # (a live worker may take a restored message again at once: count before, not after)
        return eligible

    def purge_queues(self) -> None:
        client = self.client()
        client.delete(*(q + s for q in QUEUES for s in _PRIORITY_SUFFIXES))
        client.delete("unacked", "unacked_index")

    def forget_dependencies(self) -> None:
        """Close every circuit breaker and clear every rate-limit schedule and count of
        sends (a test that opened one must not leave it to the next)."""
        client = self.client()
        try:
            keys = [
                key
                for pattern in ("jobs:breaker:*", "jobs:schedule:*", "jobs:sent:*")
                for key in client.scan_iter(pattern)
            ]
        except redis.ConnectionError:
            return  # stopped by the test (it starts again empty, in a fresh folder)
        if keys:
            client.delete(*keys)


class Gateway(_Server):
    """The fake payment gateway as its own process, with its own ledger file."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.db = directory / "gateway.sqlite3"
        self.log = directory / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**role_env(), "GATEWAY_PORT": str(self.port), "SHOP_VAR_DIR": str(self.db.parent)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "gateway")], cwd=REPO, env=env, stdout=log, stderr=log
            )
        wait_until(self._answers, timeout=15, what="the payment gateway")

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def ledger(self, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        params = {"idempotency_key": idempotency_key} if idempotency_key else {}
        response = httpx.get(f"{self.url}/v1/charges", params=params, timeout=5)
        response.raise_for_status()
        return list(response.json()["charges"])

    def control(self, **changes: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/v1/control", json=changes, timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        """Every fault setting back to the gateway's default (latency, failures, outage,
        rate limit, how long a key is remembered, ...): none carries over to a later test."""
        from dataclasses import fields

        from deploy.gateway.server import GatewayConfig

        defaults = GatewayConfig()
        self.control(**{field.name: getattr(defaults, field.name) for field in fields(defaults)})

    def stats(self, since: int | None = None) -> dict[str, Any]:
        """What the gateway received, accepted and refused per clock second (its own
        count: the witness of the shop's rate limit)."""
        params = {"since": since} if since is not None else {}
        response = httpx.get(f"{self.url}/v1/stats", params=params, timeout=5)
        response.raise_for_status()
        return dict(response.json())


# --- Celery workers ----------------------------------------------------------------------


class Worker:
    """`deploy/bin/worker` for one queue: a real worker process, prefork unless asked."""

    def __init__(
        self,
        queue: str,
        env: dict[str, str],
        log_dir: Path,
        concurrency: int = 1,
        include: str = "",
        pool: str = "prefork",
    ) -> None:
        self.queue = queue
        self.include = include
        self.name = f"{queue}@test-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.log = log_dir / f"worker-{self.name}.log"
        self.concurrency = concurrency
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Worker":
        args = [str(BIN / "worker"), self.queue, "-n", self.name, "-c", str(self.concurrency)]
        args += ["-P", self.pool, "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        if self.include:
            args += ["-I", self.include]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=role_env(self.env),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{_log_tail(self.log)}")
            try:
                with control_connection() as connection:  # not a pooled one (jobs/NOTES.md §10)
                    replies = app.control.ping([self.name], timeout=0.5, connection=connection)
            except (redis.ConnectionError, OSError):  # Redis is down or restarting
                return False
            return bool(replies)

        wait_until(ready, timeout=timeout, interval=0.2, what=f"worker {self.name}")

    def stop(self, timeout: float = 30) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL only if it does not finish in `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with suppress(ProcessLookupError):  # what of its group outlived it (an orphan child)
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, event: str, task_name: str | None = None) -> list[dict[str, Any]]:
        """The job events of this kind in the worker's log (LOG_FORMAT=json, jobs/logs.py),
        of one task only when `task_name` is given."""
        lines = self.log_text().splitlines()
        records = (json.loads(line) for line in lines if line[:1] == "{")
        return [
            record
            for record in records
            if record.get("event") == event
            and (task_name is None or record.get("task_name") == task_name)
        ]

    def succeeded(self, task_id: str) -> bool:
        """Whether the worker logged `task_id` as succeeded: the witness, since results are
        not stored (jobs ignores them unless a task asks)."""
        return any(record.get("task_id") == task_id for record in self.events("succeeded"))


class WorkerStarter:
    """Starts real workers for a test (the `start_worker` fixture) or a module of tests (a
    module-scoped fixture, `with WorkerStarter(...) as start:`), and stops every one it
    started when the test or the `with` block ends, passed or failed: a worker left
    running would eat the next test's messages. One that will not stop warmly is killed;
    one the test stopped or killed itself is left as it is."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: list[Worker] = []

    def __call__(
        self,
        queue: str,
        *,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        include: str = "",
        pool: str = "prefork",
        ready: bool = True,
        log_dir: Path | None = None,
    ) -> Worker:
        """A worker on `queue` (`env` and `log_dir` default to the starter's), by default
        once it answers a ping: it consumes its queue by then. With `ready=False` the
        caller waits (`wait_ready`), or starts several first and waits for each."""
        worker = Worker(
            queue,
            self.env if env is None else env,
            self.log_dir if log_dir is None else log_dir,
            concurrency,
            include=include,
            pool=pool,
        )
        self.started.append(worker.start())
        if ready:
            worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        """Stop every worker started, even when stopping one of them fails (then raise)."""
        errors = []
        for worker in reversed(self.started):
            try:
                worker.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "WorkerStarter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


# --- Tasks of the jobs layer, as a worker runs them -----------------------------------------


def send(name: str, *args: object, headers: dict[str, str] | None = None) -> str:
    """Send one of tests/fault_tasks.py's tasks; its id."""
    return str(app.send_task(f"tests.fault_tasks.{name}", args=list(args), headers=headers).id)


def attempts(path: Path) -> list[float]:
    """The times a fault task wrote to `path`, one line per attempt."""
    return [float(line) for line in path.read_text().splitlines()] if path.exists() else []


def dead_letter(task_id: str, timeout: float = 30) -> DeadLetter:
    return wait_until(
        lambda: DeadLetter.objects.filter(task_id=task_id).first(),
        timeout=timeout,
        what=f"the dead letter of {task_id}",
    )


def own_task(**options: object) -> ReliableTask:
    """A task class as `@shared_task(base=ReliableTask, **options)` builds it."""
    return type("OwnTask", (ReliableTask,), {"name": "tests.own_task", **options})()


def run_as_delivered(task: ReliableTask, *, task_id: str = "t-1", retries: int = 0) -> object:
    """Call `task` as a worker calls a delivered message: not eagerly, not directly, so the
    base task's guard and retry policy apply (a retry is published to the broker)."""
    type(task).bind(app)  # as the worker's app has its tasks
    task.push_request(id=task_id, retries=retries, called_directly=False, args=[], kwargs={})
    try:
        return task()
    finally:
        task.pop_request()


# --- /metrics ---------------------------------------------------------------------------


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves: (name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- Orders through the shop's API (the Django test client) ---------------------------------

TOKEN = "tok_visa"  # the gateway's test token for a card that charges
ORDER = {
    "email": "ada@example.com",
    "card_token": TOKEN,
    "items": [{"sku": "MUG", "quantity": 1}],
}


def order_body(**overrides: object) -> dict[str, object]:
    """A checkout of two mugs and a tee, paid with the gateway's test card that charges."""
    body: dict[str, object] = {
        "email": "ada@example.com",
        "card_token": TOKEN,
        "items": [{"sku": "MUG", "quantity": 2}, {"sku": "TEE", "quantity": 1}],
    }
    body.update(overrides)
    return body


def assert_nothing_written(broker: RedisServer, stock_before: dict[str, int]) -> None:
    assert Order.objects.count() == 0
    assert Payment.objects.count() == 0
    assert_nothing_enqueued()
    assert dict(Product.objects.values_list("sku", "stock")) == stock_before
    assert broker.queue_lengths()["payments"] == 0


def place_order(client: Any, card: str = TOKEN) -> int:  # card: a gateway test token
    body = {**ORDER, "card_token": card}
    response = client.post("/api/orders/", body, content_type="application/json")
    assert response.status_code == 201, response.content
    return Order.objects.get(reference=response.json()["id"]).pk


def status_url(order_id: int) -> str:
    return f"/api/orders/{Order.objects.get(pk=order_id).reference}/"


def wait_for_receipt(client: Any, order_id: int, timeout: float = 45) -> dict:
    def settled() -> dict | None:
        body = client.get(status_url(order_id)).json()
        return body if body["receipt"]["status"] == "sent" else None

    return wait_until(settled, timeout=timeout, interval=0.2, what=f"receipt of order {order_id}")


def mails_with(mail_dir: Path, message_id: str) -> int:
    return sum(message_id in path.read_text() for path in mail_dir.iterdir())


# --- `make run`'s stack (tests/test_make_run.py, the browser tests) ------------------------


def runner_env(tmp_path: Path, broker_port: int) -> dict[str, str]:
    # the embedded default: no DATABASE_URL, and the real settings module, not the tests'
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    gateway_port = free_port()
    env.update(
        SHOP_VAR_DIR=str(tmp_path / "var"),
        WEB_PORT=str(free_port()),
        FLOWER_PORT=str(free_port()),
        GATEWAY_PORT=str(gateway_port),
        PAYMENT_GATEWAY_URL=f"http://127.0.0.1:{gateway_port}",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT="1",
    )
    return env


def start_make_run(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`make run`'s launcher (`make run ARGS=...`: `args`) in a session of its own (as a
    terminal would run it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "deploy/run_local.py", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_make_run(proc: subprocess.Popen[bytes]) -> None:
    """One Ctrl-C stops everything; raises if it did not within a minute."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Shop:
    """`make run`'s stack as the browser tests drive it."""

    site: str
    gateway: str
    var: Path
    admin_user: str
    admin_password: str
    env: dict[str, str]

    def manage(self, *args: str) -> str:
        """`manage.py` against the stack's own database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    def mails(self) -> list[Path]:
        folder = self.var / "mail"
        return sorted(folder.iterdir()) if folder.exists() else []


def gateway_control(shop: Shop, **settings: object) -> None:
    httpx.post(f"{shop.gateway}/v1/control", json=settings, timeout=10).raise_for_status()


def dead_letter_count(shop: Shop, reason: str = "") -> int:
    """Dead letters waiting for an operator (of one reason, if given), read from the
    stack's SQLite database."""
    query = "SELECT count(*) FROM jobs_deadletter WHERE status = 'dead'"
    query += " AND reason = ?" if reason else ""
    with closing(sqlite3.connect(shop.var / "shop.sqlite3", timeout=10)) as db:
        return int(db.execute(query, (reason,) if reason else ()).fetchone()[0])


def create_dead_letters(shop: Shop, reason: str, count: int) -> None:
    """Dead letters of the test's own (a receipt task's, with nothing to replay): a test
    never relies on the ones another test left."""
    shop.manage(
        "shell",
        "-c",
        "import uuid; from jobs.models import DeadLetter; "
        "DeadLetter.objects.bulk_create(DeadLetter(task_id=str(uuid.uuid4()), "
        f"task_name='shop.tasks.emails.send_receipt', reason={reason!r}) "
        f"for _ in range({count}))",
    )


# --- The browser (pages are Playwright's; Playwright is imported where it is used) ---------

SCREENSHOTS = REPO / "var" / "screenshots"


def screenshot(page: Any, name: str) -> Path:
    """Save the page under var/screenshots/ (the README shows some of them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Any, shop: Shop, user: str, password: str) -> None:
    page.goto(f"{shop.site}/admin/login/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{shop.site}/admin/")


def field(page: Any, name: str) -> Any:
    """One live field of the order page's status box."""
    return page.locator(f"#order-status [data-field={name}]")


def add_to_cart(page: Any, product: str, quantity: int = 1) -> None:
    card = page.locator("li.product", has_text=product)
    card.get_by_label("Quantity").fill(str(quantity))
    card.get_by_role("button", name="Add to cart").click()


def fill_checkout(page: Any, card: str) -> None:
    if not page.url.endswith("/cart/"):
        page.get_by_role("link", name=re.compile("^Cart")).click()
    page.get_by_role("link", name="Check out").click()
    page.get_by_label("Email for the receipt").fill("ada@example.com")
    page.get_by_label("Card number").fill(card)
    page.get_by_role("button", name=re.compile("Place order")).click()


def check_out(page: Any, card: str) -> None:
    fill_checkout(page, card)
    page.wait_for_url(re.compile(r"/orders/[0-9a-f-]{36}/$"))


def place_order_the_gateway_cannot_charge(shop: Shop, page: Any) -> str:
    """Check out while the gateway is down until the charge is a dead letter (its
    retries exhausted); the order page's address."""
    from playwright.sync_api import expect

    dead_before = dead_letter_count(shop)

    def outage_once_tokenized(route: Any) -> None:
        # The card is a token by now: the gateway fails after the order is placed.
        if route.request.method == "POST":
            gateway_control(shop, outage=True)
        route.continue_()

    page.route(f"{shop.site}/checkout/", outage_once_tokenized)
    try:
        page.goto(f"{shop.site}/")
        add_to_cart(page, "Enamel camp mug")
        check_out(page, "4242 4242 4242 4242")
        page.unroute(f"{shop.site}/checkout/")
        expect(field(page, "payment")).to_have_text("Payment pending")
        wait_until(
            lambda: dead_letter_count(shop) > dead_before, timeout=90, what="the dead letter"
        )
    finally:
        gateway_control(shop, outage=False)
    return str(page.url)


# --- Deployment files: the start scripts, the Dockerfile, the example env file ------------

# The images deploy/Dockerfile builds -> the stage (target) that builds each.
SHOP_IMAGE, GATEWAY_IMAGE = "reliable-shop", "reliable-shop-gateway"
IMAGES = {SHOP_IMAGE: "shop", GATEWAY_IMAGE: "gateway"}


def variables_read_by_start_scripts() -> set[str]:
    text = "\n".join(path.read_text() for path in BIN.iterdir())
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text))


def variables_in_example() -> set[str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return {m.group(1) for line in lines if (m := re.match(r"#?\s*([A-Z][A-Z0-9_]+)=", line))}


def statements(script: str) -> list[str]:
    """The script's commands, comments dropped and continued lines joined."""
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line and not line.startswith("#")]


def dockerfile_stages() -> dict[str, list[str]]:
    """deploy/Dockerfile's stages, in order: name -> its instructions after FROM."""
    stages: dict[str, list[str]] = {}
    for line in statements((REPO / "deploy" / "Dockerfile").read_text()):
        if line.startswith("FROM "):
            stages[line.split(" AS ")[1]] = []
        else:
            stages[list(stages)[-1]].append(line)
    return stages


@cache
def context_files() -> frozenset[str]:
    """The build context: the repository's files, less what .dockerignore leaves out."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(
            any(fnmatch(part, p.removeprefix("**/")) for part in parts)
            if p.startswith("**/")
            else fnmatch(parts[0], p)
            for p in patterns
        )

    files = set()
    for folder, dirs, names in os.walk(REPO):
        here = "" if folder == str(REPO) else Path(folder).relative_to(REPO).as_posix()
        dirs[:] = [d for d in dirs if not ignored(posixpath.join(here, d))]
        files |= {posixpath.join(here, n) for n in names if not ignored(posixpath.join(here, n))}
    return frozenset(files)


def under(file: str, path: str) -> bool:
    return path == "." or file == path or file.startswith(path.rstrip("/") + "/")


@cache
def image_files(stage: str) -> frozenset[str]:
    """The repository files that the image a stage builds holds under /app: those it copies
    from the build context or from another stage, less those it deletes (rm -rf)."""
    files: set[str] = set()
    for line in dockerfile_stages()[stage]:
        instruction, *words = line.split()
        if instruction == "WORKDIR":
            assert words == ["/app"], line  # the paths below are relative to it
        elif instruction == "COPY":
            options = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            *sources, target = [w for w in words if not w.startswith("--")]
            pool = image_files(options["from"]) if "from" in options else context_files()
            for source in sources:
                path = posixpath.normpath(source.removeprefix("/app") or ".").lstrip("/")
                # every file lands where it was: the same path under /app
                dest = posixpath.normpath(target).lstrip("/")
                assert dest in (path, posixpath.dirname(path) or "."), line
                files |= {f for f in pool if under(f, path)}
        elif instruction == "RUN":
            for step in " ".join(words).split("&&"):
                if step.split()[:2] == ["rm", "-rf"]:
                    gone = step.split()[2:]
                    files = {f for f in files if not any(under(f, g) for g in gone)}
    return frozenset(files)


def longest_time_limit(queue: str) -> float:
    """The longest hard time limit of the tasks that can land on `queue`: those routed
    there, and those beat sends there by name (the canaries)."""
    app.loader.import_default_modules()
    schedule: dict[str, dict[str, Any]] = app.conf.beat_schedule
    scheduled = {
        entry["task"]
        for entry in schedule.values()
        if entry.get("options", {}).get("queue") == queue
    }
    return max(
        task.time_limit or app.conf.task_time_limit
        for name, task in app.tasks.items()
        if queue_of(name) == queue or name in scheduled
    )


# --- Databases the tests create ------------------------------------------------------------


def drop_database(url: str) -> None:
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
