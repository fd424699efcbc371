"""The whole shop as real processes on free ports, for the failure lab and the benchmarks.

A private Redis (persisting like a broker should: AOF everysec, noeviction), the fake
payment gateway, gunicorn, one Celery worker per queue and beat, all against one
PostgreSQL database that is dropped and created anew. Nothing here touches the
machine's shared Redis or another database.
"""

import argparse
import math
import os
import shlex
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent
PROCFILE = BASE_DIR / "deploy" / "Procfile"


def procfile() -> dict[str, list[str]]:
    """The commands of `make run` by process name (deploy/Procfile), split like a shell
    would, `${VARIABLES}` left for `Stack.command` to fill in."""
    lines = (line for line in PROCFILE.read_text().splitlines() if line.strip())
    return {
        name.strip(): shlex.split(command)
        for name, command in (line.split(":", 1) for line in lines if not line.startswith("#"))
    }


def pools() -> dict[str, int]:
    """Concurrency per queue, as `make run` runs them on one host: the Procfile's
    `worker_<queue>` lines (the keys are the settings' CELERY_TASK_QUEUES, which
    tests/jobs/test_routing.py checks). Compose and Kubernetes size pools for hosts of their
    own and differ."""
    found = {}
    for name, command in procfile().items():
        if name.startswith("worker_"):
            found[name.removeprefix("worker_")] = int(command[command.index("--concurrency") + 1])
    return found


QUEUES = pools()


def choose(
    parser: argparse.ArgumentParser, given: str, known: Collection[str], what: str
) -> list[str]:
    """The names in a comma-separated option, each one of `known`; a usage error otherwise."""
    names = [name.strip() for name in given.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(
            f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(known)}"
        )
    return names


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
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up in {timeout:.0f} s")


def children(pid: int) -> list[int]:
    """Direct children of a process (a worker's pool, gunicorn's workers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


class Stack:
    """Starts and stops the shop's processes. `env` is every process's environment."""

    def __init__(
        self,
        *,
        prefix: str,
        database_url: str,
        env: Mapping[str, str],
        web_workers: int = 2,
        web_threads: int = 8,
        wsgi: str = "shop.wsgi:application",
        worker_args: tuple[str, ...] = (),
    ) -> None:
        (BASE_DIR / "var").mkdir(exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=BASE_DIR / "var"))
        self.database_url = database_url
        self.redis_port, self.web_port, self.gateway_port = free_port(), free_port(), free_port()
        self.web_workers, self.web_threads = web_workers, web_threads
        self.worker_args = worker_args
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "shop.settings",
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PAYMENT_GATEWAY_URL": f"http://127.0.0.1:{self.gateway_port}",
            "SHOP_VAR_DIR": str(self.dir),
            "EMAIL_FILE_PATH": str(self.dir / "mail"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / "metrics"),
            "METRICS_DIR_SHARED": "1",  # one folder for all, new and empty: see below
            "LISTEN_HOST": "127.0.0.1",
            "WEB_PORT": str(self.web_port),
            "GATEWAY_PORT": str(self.gateway_port),
            "WEB_APP": wsgi,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **env,
        }
        (self.dir / "metrics").mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # --- processes ----------------------------------------------------------------

    def spawn(self, name: str, *command: str) -> None:
        """Start a process in its own session (so its children can be signalled with it),
        logging to `<name>.log` in the stack's folder."""
        with (self.dir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                command,
                cwd=BASE_DIR,
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def start(self, *, beat: bool = True) -> None:
        """Database, Redis, gateway, web, one worker per queue, beat; returns when up."""
        manage = [sys.executable, "manage.py"]
        self.recreate_database()
        subprocess.run([*manage, "migrate", "-v", "0"], cwd=BASE_DIR, env=self.env, check=True)
        subprocess.run(
            [*manage, "seed_demo"], cwd=BASE_DIR, env=self.env, check=True, capture_output=True
        )
        self.redis()
        self.gateway()
        self.web()
        for queue in QUEUES:
            self.worker(queue)
        if beat:
            self.beat()
        wait_for("the web", lambda: httpx.get(self.url("/healthz")).status_code == 200, 60)
        wait_for("the gateway", lambda: httpx.get(self.gw("/healthz")).status_code == 200, 30)

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
        wait_for("redis", self.redis_ping, 30)  # a loaded machine starts slowly

    def redis_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def command(self, role: str, *extra: str) -> list[str]:
        """The Procfile's command for `role` with this stack's variables, then `extra`
        (the scripts let later options win)."""
        words = [string.Template(word).substitute(self.env) for word in procfile()[role]]
        return [*words, *extra]

    def gateway(self) -> None:
        self.spawn("gateway", *self.command("gateway"))

    def web(self) -> None:
        workers, threads = str(self.web_workers), str(self.web_threads)
        self.spawn("web", *self.command("web", "--workers", workers, "--threads", threads))

    def worker(self, queue: str, *extra: str, name: str = "") -> None:
        """One worker consuming `queue`, node `<name or queue>@<stack>`."""
        name = name or queue
        level = self.env.get("LOG_LEVEL", "WARNING")
        options = ("-n", self.node(name), "--loglevel", level, *self.worker_args, *extra)
        self.spawn(f"worker-{name}", *self.command(f"worker_{queue}", *options))

    def node(self, name: str) -> str:
        return f"{name}@{self.dir.name}"

    def beat(self) -> None:
        self.spawn("beat", *self.command("beat", "--loglevel", "WARNING"))

    def restart_exited(self, names: Iterable[str]) -> list[str]:
        """Start again each of these workers (and beat) that exited on its own, as systemd
        or Kubernetes would: Celery 5.7 can exit with "Unrecoverable error" when the broker
        is killed under it (jobs/NOTES.md §9). What exited, with its exit code."""
        exited = []
        for name in names:
            proc = self.procs[name]
            if proc.poll() is None:
                continue
            exited.append(f"{name} (exit {proc.returncode})")
            if name == "beat":
                self.beat()
            else:
                self.worker(name.removeprefix("worker-"))
        return exited

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def recreate_database(self) -> None:
        import psycopg

        server, name = self.database_url.rsplit("/", 1)
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
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

    def setup_django(self) -> None:
        """Make this process a client of the stack, configured as its processes are: the
        same database and broker, and the same settings for what it shares with them
        (the rate limits and breakers of the services it calls, the outbox's grace).
        A caller configured apart from the workers would count its gateway calls against
        a different limit: the lab's operator, at the default 50/s, put 41 calls in a
        second against the gateway's 40 while the workers kept to 38."""
        import django

        os.environ.update(self.client_env())
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
        sys.path.insert(0, str(BASE_DIR))
        django.setup()

    def client_env(self) -> dict[str, str]:
        """The stack's environment less what belongs to its processes alone (their
        metrics folder, the web's app)."""
        own = {"PROMETHEUS_MULTIPROC_DIR", "METRICS_DIR_SHARED", "PATH", "WEB_APP"}
        return {k: v for k, v in self.env.items() if k not in own}

    # --- addresses and control ------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def gw(self, path: str) -> str:
        return f"http://127.0.0.1:{self.gateway_port}{path}"

    def gateway_control(self, **settings: object) -> None:
        httpx.post(self.gw("/v1/control"), json=settings, timeout=10).raise_for_status()

    def gateway_seconds(self, since: float) -> list[dict[str, Any]]:
        """The gateway's own count of each clock second since `since` (GET /v1/stats):
        received, accepted, refused (429) and accepted charges."""
        params = {"since": math.floor(since)}
        response = httpx.get(self.gw("/v1/stats"), params=params, timeout=30)
        response.raise_for_status()
        return list(response.json()["seconds"])

    def children(self, name: str) -> list[int]:
        return children(self.procs[name].pid)

    def kill_children(self, name: str) -> None:
        for child in self.children(name):
            os.kill(child, signal.SIGKILL)
