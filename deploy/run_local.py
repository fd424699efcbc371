"""`make run`: prepare the local shop, then run every process in one terminal.

Migrates, seeds the demo catalog, creates the admin login (printed once), checks Redis
(starting a private redis-server when none answers and one is installed), then hands
over to honcho, which runs deploy/Procfile; one Ctrl-C stops everything.
`make run ARGS=--prometheus` also starts Prometheus with the alert rules (off by
default: it needs Debian's prometheus package, and most runs do not watch alerts).
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
BROKER = "redis"  # the Procfile's stand-in broker: started only when none answers
PROMETHEUS = "prometheus"  # started only with --prometheus
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def processes(*, prometheus: bool = False) -> list[str]:
    """The Procfile's processes but the stand-in broker (and Prometheus unless asked):
    every role, one worker per queue (a queue added to the settings and the Procfile
    starts here with no change)."""
    from deploy.stack import procfile

    left_out = {BROKER} | (set() if prometheus else {PROMETHEUS})
    return [name for name in procfile() if name not in left_out]


def _fail(message: str) -> int:
    print(f"make run: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prometheus",
        action="store_true",
        help="also start Prometheus with the alert rules (PROMETHEUS_PORT, default 9090)",
    )
    args = parser.parse_args(argv)
    os.chdir(BASE_DIR)
    sys.path.insert(0, str(BASE_DIR))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    import django

    django.setup()
    from django.conf import settings

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        WEB_PORT=str(settings.WEB_PORT),
        GATEWAY_PORT=str(settings.GATEWAY_PORT),
        FLOWER_PORT=str(settings.FLOWER_PORT),
        SHOP_VAR_DIR=str(settings.VAR_DIR),
        LISTEN_HOST="127.0.0.1",  # this machine only (the scripts' default is a container's)
    )
    # Flower takes its options from FLOWER_* variables.
    env["FLOWER_COOKIE_SECRET"] = settings.FLOWER_COOKIE_SECRET
    env["FLOWER_READ_ONLY"] = str(settings.FLOWER_READ_ONLY).lower()
    if not settings.FLOWER_BASIC_AUTH:
        env.pop("FLOWER_BASIC_AUTH", None)
    Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # whitenoise expects it
    # One metrics folder for every process of this run, emptied once here (counts start at
    # zero); the roles' scripts leave it alone (METRICS_DIR_SHARED).
    metrics_dir = Path(
        env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.VAR_DIR / "metrics"))
    )
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env["METRICS_DIR_SHARED"] = "1"

    ports = ["WEB_PORT", "GATEWAY_PORT", "FLOWER_PORT"]
    if args.prometheus:
        from deploy.watch import ALERTS_PAGE

        if shutil.which("prometheus") is None:
            return _fail(
                "--prometheus needs Prometheus: `make system-deps` installs it (Debian: "
                "apt-get install prometheus)."
            )
        env.setdefault("PROMETHEUS_PORT", "9090")
        env["PROMETHEUS_URL"] = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}{ALERTS_PAGE}"
        ports.append("PROMETHEUS_PORT")
    for name in ports:
        if _answers("127.0.0.1", int(env[name])):
            return _fail(f"port {env[name]} is in use; set {name} to a free port.")

    started = processes(prometheus=args.prometheus)
    broker = urlsplit(settings.CELERY_BROKER_URL)
    if not _redis_answers(settings.CELERY_BROKER_URL):
        where = f"{broker.hostname}:{broker.port or 6379}"
        if broker.hostname not in LOCAL_HOSTS:
            return _fail(f"no Redis answers at {where} (CELERY_BROKER_URL).")
        if shutil.which("redis-server") is None:
            return _fail(
                f"no Redis answers at {where} and no redis-server is installed.\n"
                "  Install one (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
                "install redis),\n  point CELERY_BROKER_URL at a running Redis, or run the "
                "whole stack with: docker compose up"
            )
        print(
            f"make run: no Redis at {where}; starting a private redis-server there. It keeps"
            " nothing on disk (a demo's broker): a restart loses what is queued, which the"
            " outbox relay and the reconciler then recover. Production runs Redis with AOF"
            " (docker-compose.yml, the README's checklist)."
        )
        env["REDIS_PORT"] = str(broker.port or 6379)
        started.insert(0, BROKER)

    manage = [sys.executable, "manage.py"]
    site = f"http://127.0.0.1:{settings.WEB_PORT}"
    for command in (
        ["migrate", "--noinput", "-v", "0"],
        ["seed_demo"],
        ["ensure_admin", "--url", f"{site}/admin/"],
    ):
        if subprocess.run([*manage, *command], env=env, check=False).returncode:
            return _fail(f"`manage.py {command[0]}` failed (its error is above).")

    print(
        f"\n  shop:   {site}/\n  admin:  {site}/admin/\n"
        f"  flower: http://127.0.0.1:{settings.FLOWER_PORT}/\n"
        + (f"  alerts: {env['PROMETHEUS_URL']}\n" if args.prometheus else "")
        + f"  mail:   {settings.EMAIL_FILE_PATH}\n  Ctrl-C stops everything.\n",
        flush=True,
    )
    honcho = [sys.executable, "-m", "honcho", "start", "-f", "deploy/Procfile", "-d", "."]
    os.execve(sys.executable, [*honcho, *started], env)
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main())
