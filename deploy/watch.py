"""A real Prometheus watching the shop, with the project's alert rules
(deploy/prometheus/alerts.yml): for `make run ARGS=--prometheus` (deploy/bin/prometheus)
and for the failure lab, which reads the alerts back from Prometheus's own API.

`python -m deploy.watch --scrape 127.0.0.1:8000 --data var/prometheus --port 9090` writes
the configuration into the data folder and execs Debian's `prometheus` (apt-get install
prometheus; `make system-deps` installs it).

Every process of `make run` and of the lab writes its counts to one metrics folder, which
the web's /metrics sums with the state it reads at scrape time: scraping the web alone
sees everything.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

BASE_DIR = Path(__file__).resolve().parent.parent
RULES = BASE_DIR / "deploy" / "prometheus" / "alerts.yml"
BINARY = "prometheus"
# Debian's build serves the classic web UI only (no React UI): its alerts page is here;
# the official image's (docker-compose.yml) is at /alerts.
ALERTS_PAGE = "/classic/alerts"
MISSING = (
    "prometheus is not installed: `make system-deps` installs it (Debian: apt-get install "
    "prometheus)"
)

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> float:
    """A Prometheus duration (`1h30m`, `500ms`) in seconds."""
    return float(sum(int(n) * _UNITS[unit] for n, unit in _DURATION.findall(duration)))


def duration(value: float) -> str:
    """Seconds as a Prometheus duration: whole seconds, or whole milliseconds."""
    return f"{round(value)}s" if value == round(value) else f"{round(value * 1000)}ms"


def config(scrape: list[str], rule_files: list[Path], interval: float) -> dict[str, Any]:
    """Scrape and evaluate every `interval` seconds; a scrape may take the whole interval
    (a failed scrape makes every series stale, and a pending alert starts over)."""
    every = f"{max(1, round(interval))}s"
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": "shop",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": scrape}],
            }
        ],
    }


def scaled_rules(factor: float, floor: float = 8.0) -> dict[str, Any]:
    """The project's rules with every duration divided by `factor`: each alert's `for:`,
    each range of a rate (never below `floor` seconds, four scrapes; `offset` and
    subqueries are not scaled: the rules have none), and each threshold on an age in
    seconds (`..._age_seconds > 120`). The expressions, labels and annotations are the
    project's own; only the clock runs faster, so a fault of tens of seconds shows what
    production would see over minutes."""

    def shorter(text: str) -> str:
        return duration(max(floor, seconds(text) / factor))

    def ages(expr: str) -> str:
        return re.sub(
            r"(_age_seconds\b[^\n]*?>\s*)(\d+(?:\.\d+)?)",
            lambda m: f"{m.group(1)}{float(m.group(2)) / factor:g}",
            expr,
        )

    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r"\[(\w+)\]", lambda m: f"[{shorter(m.group(1))}]", rule["expr"])
            rule["expr"] = ages(expr)
            if "for" in rule:
                rule["for"] = duration(seconds(rule["for"]) / factor)
    return document


class Prometheus:
    """A private Prometheus on a free port, its data in `folder`; `alerts()` reads its
    API. Stopped with `stop()` (its data stays in the folder)."""

    def __init__(self, folder: Path, port: int, scrape: list[str], rules: dict[str, Any]):
        self.folder, self.port = folder, port
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        self.interval = 2.0  # the lab's /metrics reads the broker: once a second is a load
        (folder / "prometheus.yml").write_text(
            yaml.safe_dump(config(scrape, [folder / "alerts.yml"], self.interval))
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            raise RuntimeError(MISSING)
        with (self.folder / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, *arguments(self.folder, f"127.0.0.1:{self.port}")],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Prometheus did not start: see {self.folder / 'prometheus.log'}")

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        reply.raise_for_status()
        return reply.json()["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now: labels, state, activeAt, value."""
        return list(self.api("alerts")["alerts"])

    def targets_up(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def arguments(folder: Path, listen: str) -> list[str]:
    return [
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=2d",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.watch", description=__doc__)
    parser.add_argument("--scrape", required=True, help="host:port of the web's /metrics")
    parser.add_argument("--data", required=True, type=Path, help="configuration and data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--interval", type=float, default=5.0, help="scrape and evaluation")
    args = parser.parse_args(argv)
    binary = shutil.which(BINARY)
    if binary is None:
        print(f"deploy.watch: {MISSING}", file=sys.stderr)
        return 2
    args.data.mkdir(parents=True, exist_ok=True)
    (args.data / "prometheus.yml").write_text(
        yaml.safe_dump(config([args.scrape], [RULES], args.interval))
    )
    listen = f"{args.host}:{args.port}"
    os.execv(binary, [binary, *arguments(args.data, listen)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
