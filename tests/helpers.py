"""The tests' helpers, in one module: test modules import them from here, never from one
another or from a conftest (conftest files hold fixtures, used as fixtures).

Real processes for the tests (a private Redis, the payment gateway, Celery workers) run
on free ports and temporary folders; the machine's shared services are never stopped or
flushed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
from django.conf import settings

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "deploy" / "bin"  # how every role starts, here as in make run and the images
# The shop's queues, as its settings declare them (once: CELERY_TASK_QUEUES).
QUEUES = tuple(queue.name for queue in settings.CELERY_TASK_QUEUES)
# kombu keeps each queue as one Redis list per priority step: name, name\x06\x163, ...
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


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
        self.control(latency_ms=0, failure_rate=0, timeout_rate=0, outage=False, rate_limit=None)

    def stats(self, since: int | None = None) -> dict[str, Any]:
        """What the gateway received, accepted and refused per clock second (its own
        count: the witness of the shop's rate limit)."""
        params = {"since": since} if since is not None else {}
        response = httpx.get(f"{self.url}/v1/stats", params=params, timeout=5)
        response.raise_for_status()
        return dict(response.json())


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
        from jobs import app

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{_log_tail(self.log)}")
            try:
                return bool(app.control.ping(destination=[self.name], timeout=0.5))
            except (redis.ConnectionError, OSError):  # our pooled connection died with Redis
                return False

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
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, event: str) -> list[dict[str, Any]]:
        """The job events of this kind in the worker's log (LOG_FORMAT=json, jobs/logs.py)."""
        lines = self.log_text().splitlines()
        records = (json.loads(line) for line in lines if line[:1] == "{")
        return [record for record in records if record.get("event") == event]

    def succeeded(self, task_id: str) -> bool:
        """Whether the worker logged `task_id` as succeeded: the witness, since results are
        not stored (jobs ignores them unless a task asks)."""
        return any(record.get("task_id") == task_id for record in self.events("succeeded"))
