"""`make chaos`: the failure lab. Places orders over HTTP while killing things, then
judges the outcome by independent witnesses, not by the shop's own bookkeeping:

  - accepted orders (HTTP 201) vs orders that reached a terminal state or a dead letter;
  - the payment gateway's own ledger: charges per order;
  - the mail folder: receipts per Message-ID;
  - the dead-letter table: every declined card there as `permanent_error`, tried once.

Runs the full stack on PostgreSQL (database `shop_chaos`, recreated) with a private
Redis that persists like a broker should (AOF everysec, noeviction). Exit status 0 only
when every invariant holds.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent
GOOD, DECLINED = "4242424242424242", "4000000000000002"
QUEUES = {"payments": 2, "emails": 2, "reports": 1, "default": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: S110  (not up yet)
            pass
        time.sleep(0.2)
    raise SystemExit(f"chaos: {what} did not come up in {timeout:.0f} s")


class Lab:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-", dir=BASE_DIR / "var"))
        self.redis_port, self.web_port, self.gateway_port = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "shop.settings",
            "DATABASE_URL": args.database_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PAYMENT_GATEWAY_URL": f"http://127.0.0.1:{self.gateway_port}",
            "SHOP_VAR_DIR": str(self.dir),
            "EMAIL_FILE_PATH": str(self.dir / "mail"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / "metrics"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Quick recovery: relay every 2 s, reconcile stuck orders after 1 minute.
            "OUTBOX_RELAY_INTERVAL": "2",
            "OUTBOX_RELAY_GRACE": "2",
            "RECONCILE_INTERVAL": "15",
            "RECONCILE_AFTER_MINUTES": "1",
            "RETRY_BACKOFF_CAP": "10",
            "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "2",
            "GATEWAY_FAILURE_RATE": str(args.gateway_failure_rate),
            "GATEWAY_TIMEOUT_RATE": str(args.gateway_timeout_rate),
            "GATEWAY_TIMEOUT_SECONDS": "17",  # past the client's 15 s read timeout
            "GATEWAY_SEED": str(args.seed),
            "LOG_LEVEL": "WARNING",
        }
        (self.dir / "metrics").mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.faults: list[tuple[float, str]] = []
        self.log = (self.dir / "processes.log").open("ab")

    # --- processes ----------------------------------------------------------------

    def spawn(self, name: str, *command: str) -> None:
        self.procs[name] = subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env=self.env,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def redis(self) -> None:
        self.spawn(
            "redis",
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
        )
        wait_for("redis", lambda: self._redis_ping(), 10)

    def _redis_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def worker(self, queue: str) -> None:
        self.spawn(
            f"worker-{queue}",
            sys.executable,
            "-m",
            "celery",
            "-A",
            "jobs",
            "worker",
            "-Q",
            queue,
            "-n",
            f"{queue}@chaos",
            "-c",
            str(QUEUES[queue]),
            "--loglevel",
            "WARNING",
        )

    def start(self) -> None:
        manage = [sys.executable, "manage.py"]
        self.recreate_database()
        subprocess.run([*manage, "migrate", "-v", "0"], cwd=BASE_DIR, env=self.env, check=True)
        subprocess.run([*manage, "seed_demo"], cwd=BASE_DIR, env=self.env, check=True)
        self.redis()
        self.spawn(
            "gateway",
            sys.executable,
            "-m",
            "shop.gateway",
            "--port",
            str(self.gateway_port),
            "--db",
            str(self.dir / "gateway.sqlite3"),
        )
        self.spawn(
            "web",
            sys.executable,
            "-m",
            "gunicorn",
            "shop.wsgi:application",
            "--bind",
            f"127.0.0.1:{self.web_port}",
            "--workers",
            "2",
            "--threads",
            "8",
        )
        for queue in QUEUES:
            self.worker(queue)
        self.spawn(
            "beat",
            sys.executable,
            "-m",
            "celery",
            "-A",
            "jobs",
            "beat",
            "--pidfile",
            str(self.dir / "beat.pid"),
            "--loglevel",
            "WARNING",
        )
        wait_for("the web", lambda: httpx.get(self.url("/healthz")).status_code == 200, 60)
        wait_for("the gateway", lambda: httpx.get(self.gw("/healthz")).status_code == 200, 30)

    def recreate_database(self) -> None:
        import psycopg

        url = self.args.database_url
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def gw(self, path: str) -> str:
        return f"http://127.0.0.1:{self.gateway_port}{path}"

    # --- load and faults --------------------------------------------------------------

    def place_orders(self) -> tuple[list[str], list[str], int]:
        cards = [
            DECLINED if self.rng.random() < self.args.declined_share else GOOD
            for _ in range(self.args.orders)
        ]
        skus = ["MUG-001", "TEE-002", "BAG-003", "PEN-004", "NBK-005", "CAP-006"]

        def order(card: str) -> tuple[str, str | None]:
            body = {
                "email": "chaos@example.com",
                "card": card,
                "items": [{"sku": random.choice(skus), "quantity": 1}],
            }
            for _ in range(20):  # a client retries a failed request (the web was killed)
                try:
                    response = httpx.post(self.url("/api/orders/"), json=body, timeout=30)
                except httpx.HTTPError:
                    time.sleep(0.5)
                    continue
                if response.status_code == 201:
                    return card, str(response.json()["id"])
                return card, None
            return card, None

        with ThreadPoolExecutor(self.args.concurrency) as pool:
            results = list(pool.map(order, cards))
        accepted = [ref for card, ref in results if ref and card == GOOD]
        declined = [ref for card, ref in results if ref and card == DECLINED]
        return accepted, declined, sum(1 for _, ref in results if ref is None)

    def inject_faults(self, stop: threading.Event) -> None:
        faults = [
            self.kill_child,
            self.kill_worker,
            self.restart_broker,
            self.broker_outage,
            self.kill_web_worker,
        ]
        while not stop.wait(self.args.fault_every):
            fault = self.rng.choice(faults)
            self.faults.append((time.monotonic(), fault.__name__))
            fault()

    def _children(self, pid: int) -> list[int]:
        path = Path(f"/proc/{pid}/task/{pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill_child(self) -> None:
        queue = self.rng.choice(list(QUEUES))
        children = self._children(self.procs[f"worker-{queue}"].pid)
        if children:
            os.kill(self.rng.choice(children), signal.SIGKILL)

    def kill_worker(self) -> None:
        queue = self.rng.choice(["payments", "emails"])
        proc = self.procs[f"worker-{queue}"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.worker(queue)

    def restart_broker(self) -> None:
        self.procs["redis"].terminate()
        self.procs["redis"].wait()
        self.redis()

    def broker_outage(self) -> None:
        self.procs["redis"].kill()
        self.procs["redis"].wait()
        time.sleep(self.args.outage_seconds)
        self.redis()

    def kill_web_worker(self) -> None:
        children = self._children(self.procs["web"].pid)
        if children:
            os.kill(self.rng.choice(children), signal.SIGKILL)  # gunicorn starts another

    # --- the verdict ----------------------------------------------------------------------

    def settle(self, accepted: list[str], declined: list[str]) -> float:
        start = time.monotonic()
        deadline = start + self.args.settle_timeout
        while time.monotonic() < deadline:
            if self.unsettled(accepted, declined) == 0:
                break
            time.sleep(2)
        return time.monotonic() - start

    def status(self, ref: str) -> dict:
        return httpx.get(self.url(f"/api/orders/{ref}/"), timeout=10).json()

    def unsettled(self, accepted: list[str], declined: list[str]) -> int:
        done = sum(1 for ref in accepted if self.status(ref)["receipt"]["status"] == "sent")
        failed = sum(1 for ref in declined if self.status(ref)["status"] == "failed")
        return len(accepted) + len(declined) - done - failed

    def verdict(
        self, accepted: list[str], declined: list[str], refused: int, settle: float
    ) -> bool:
        import django

        os.environ.update({k: self.env[k] for k in ("DATABASE_URL", "CELERY_BROKER_URL")})
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
        sys.path.insert(0, str(BASE_DIR))
        django.setup()
        from jobs.models import DeadLetter
        from shop.models import Order, Receipt

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
        lost = [
            r
            for r in accepted
            if self.status(r)["receipt"]["status"] != "sent"
            and not DeadLetter.objects.filter(args=[orders[r].payment.pk]).exists()
        ]
        doubles = [o.pk for o in paid if charges[f"Order #{o.pk}"] > 1]
        uncharged = [o.pk for o in paid if charges[f"Order #{o.pk}"] == 0]
        declined_pks = [orders[r].payment.pk for r in declined]
        declined_dead = DeadLetter.objects.filter(
            reason="permanent_error", attempts=1, task_name="shop.tasks.payments.charge_payment"
        ).values_list("args", flat=True)
        declined_ok = sorted(declined_pks) == sorted(a[0] for a in declined_dead)
        duplicates = sum(n - 1 for n in mails.values() if n > 1)
        receipts = Receipt.objects.count()
        injected = Counter(name for _, name in self.faults)
        total = len(accepted) + len(declined)
        rows = [
            ("orders accepted (201) / refused", f"{total} / {refused}", True),
            ("lost (accepted, no receipt, no dead letter)", len(lost), not lost),
            ("paid orders charged twice (gateway ledger)", len(doubles), not doubles),
            ("paid orders with no charge (gateway ledger)", len(uncharged), not uncharged),
            (
                "receipt rows (one per paid order)",
                f"{receipts} for {len(paid)} paid",
                receipts == len(paid),
            ),
            ("duplicate emails (same Message-ID, a provider drops them)", duplicates, True),
            (
                "declined: all dead-lettered permanent_error, tried once",
                f"{len(declined_pks)} declined",
                declined_ok,
            ),
            ("faults injected", ", ".join(f"{n} {f}" for f, n in injected.items()) or "none", True),
            ("time to settle after the last fault", f"{settle:.0f} s", True),
        ]
        width = max(len(r[0]) for r in rows)
        print(
            "\n"
            + "\n".join(
                f"{'ok ' if ok else 'BAD'} {name:<{width}}  {value}" for name, value, ok in rows
            )
        )
        (self.dir / "verdict.json").write_text(
            json.dumps({name: str(value) for name, value, _ in rows}, indent=2)
        )
        return all(ok for _, _, ok in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--declined-share", type=float, default=0.05)
    parser.add_argument("--fault-every", type=float, default=4.0, help="seconds between faults")
    parser.add_argument("--outage-seconds", type=float, default=5.0)
    parser.add_argument(
        "--chaos-seconds", type=float, default=30.0, help="faults go on this long after the load"
    )
    parser.add_argument("--gateway-failure-rate", type=float, default=0.05)
    parser.add_argument("--gateway-timeout-rate", type=float, default=0.01)
    parser.add_argument("--settle-timeout", type=float, default=600.0)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "CHAOS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop_chaos"
        ),
    )
    args = parser.parse_args()
    if args.orders < 1 or not 0 <= args.declined_share <= 1:
        parser.error("--orders must be positive and --declined-share within 0..1")
    lab = Lab(args)
    print(f"chaos: lab in {lab.dir}; {args.orders} orders, seed {args.seed}", flush=True)
    try:
        lab.start()
        stop = threading.Event()
        chaos = threading.Thread(target=lab.inject_faults, args=(stop,))
        chaos.start()
        accepted, declined, refused = lab.place_orders()
        print(f"chaos: load done; faults go on for {args.chaos_seconds:.0f} s", flush=True)
        time.sleep(args.chaos_seconds)
        stop.set()
        chaos.join()
        print(f"chaos: {len(lab.faults)} fault(s) injected; settling...", flush=True)
        settle = lab.settle(accepted, declined)
        ok = lab.verdict(accepted, declined, refused, settle)
    finally:
        lab.stop()
    print("\nchaos: every invariant holds" if ok else "\nchaos: INVARIANT BROKEN (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
