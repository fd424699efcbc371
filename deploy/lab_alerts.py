"""The failure lab watched like production: a real Prometheus (deploy/watch.py) scrapes
the lab's web, whose /metrics sums every process of the stack, and evaluates the
project's alert rules with their clock sped up (`scaled_rules`: every `for:`, rate range
and age threshold divided by SCALE). The lab reads the alerts back from Prometheus's
API: none may fire in a quiet period before the faults, and each watched fault, held
until its alerts fire, must fire them within a bound and see them resolved after
recovery.
"""

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.watch import RULES, Prometheus, scaled_rules, seconds

SCALE = 10.0  # the lab's clock for alerts: production's minutes are the lab's 6 s units
# What the rules' timing does not cover, in the time to fire: a scrape and an evaluation
# (2 s each), the consumers count cached by /metrics (15 s), the canary period (3 s here).
SLACK = 20.0
RESOLVE_BOUND = 60.0  # seconds from recovery until an alert must have resolved


def fire_bound(alert: str, labels: dict[str, str], factor: float = SCALE) -> float:
    """Seconds from the start of a fault until `alert` (with `labels`) must fire: its
    scaled `for:` and age threshold (the threshold of the labels' queue), plus SLACK."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                ages = [
                    float(threshold)
                    for selector, threshold in re.findall(
                        r"_age_seconds\b(\{[^}]*\})?\s*>\s*(\d+(?:\.\d+)?)", rule["expr"]
                    )
                    if not selector or f'queue="{labels.get("queue")}"' in selector
                ]
                wait = seconds(rule.get("for", "0s")) + max(ages, default=0.0)
                return wait / factor + SLACK
    raise KeyError(alert)


@dataclass
class Episode:
    """One alert (name and labels) from the moment Prometheus listed it until it left."""

    name: str
    labels: dict[str, str]
    pending_at: float
    firing_at: float | None = None
    gone_at: float | None = None

    def matches(self, name: str, **labels: str) -> bool:
        return self.name == name and all(self.labels.get(k) == v for k, v in labels.items())

    def describe(self) -> str:
        shown = ", ".join(
            f"{k}={v}"
            for k, v in sorted(self.labels.items())
            if k not in ("severity", "instance", "job")  # the rule's and the target's
        )
        return f"{self.name}{{{shown}}}" if shown else self.name


@dataclass
class AlertWatch:
    """Polls Prometheus's /api/v1/alerts every second: every episode of every alert."""

    prometheus: Prometheus
    episodes: list[Episode] = field(default_factory=list)
    errors: int = 0
    polls: int = 0  # answers read so far

    def start(self) -> "AlertWatch":
        threading.Thread(target=self._poll, name="alert-watch", daemon=True).start()
        return self

    def _poll(self) -> None:
        open_: dict[tuple[str, tuple[tuple[str, str], ...]], Episode] = {}
        while True:
            time.sleep(1)
            try:
                listed = self.prometheus.alerts()
            except Exception:  # Prometheus busy a moment: ask again
                self.errors += 1
                continue
            now = time.monotonic()
            seen = set()
            for alert in listed:
                labels = dict(alert["labels"])
                name = labels.pop("alertname")
                key = (name, tuple(sorted(labels.items())))
                seen.add(key)
                episode = open_.get(key)
                if episode is None:
                    episode = open_[key] = Episode(name, labels, pending_at=now)
                    self.episodes.append(episode)
                if alert["state"] == "firing" and episode.firing_at is None:
                    episode.firing_at = now
            for key in [k for k in open_ if k not in seen]:
                open_.pop(key).gone_at = now
            self.polls += 1

    def fired(self, since: float, until: float | None = None) -> list[Episode]:
        """Episodes that were firing at some moment in [since, until]."""
        end = until if until is not None else float("inf")
        return [
            e
            for e in self.episodes
            if e.firing_at is not None
            and e.firing_at <= end
            and (e.gone_at is None or e.gone_at >= since)
        ]

    def active(self, names: set[str] | None = None) -> list[Episode]:
        """Episodes pending or firing now (of these alert names, if given)."""
        return [
            e for e in self.episodes if e.gone_at is None and (names is None or e.name in names)
        ]

    def started_firing(self, since: float) -> list[str]:
        """Each alert (name and labels) that started firing after `since`, once."""
        return sorted({e.describe() for e in self.episodes if (e.firing_at or 0) >= since})

    def pending_in(self, since: float, until: float) -> list[Episode]:
        """Episodes that went pending in [since, until] (firing or not)."""
        return [e for e in self.episodes if since <= e.pending_at <= until]

    def first_firing(self, since: float, name: str, **labels: str) -> Episode | None:
        """The first episode of the alert that started firing after `since` (one already
        firing then is an earlier failure's, not this one's)."""
        found = [
            e
            for e in self.episodes
            if e.matches(name, **labels) and e.firing_at is not None and e.firing_at >= since
        ]
        return min(found, key=lambda e: e.firing_at or 0, default=None)


@dataclass
class Watched:
    """A fault held until its alerts fire (or their bound passes), then undone."""

    name: str
    what: str
    expected: list[tuple[str, dict[str, str]]]  # alert name, labels it must carry
    started: float = 0.0
    recovered: float = 0.0


def start_prometheus(folder: Path, port: int, web: str) -> Prometheus:
    prometheus = Prometheus(folder, port, [web], scaled_rules(SCALE))
    prometheus.start()
    return prometheus


def screenshot(url: str, path: Path) -> bool:
    """Prometheus's alerts page as a PNG, by headless Chromium (installed by `make
    system-deps`); False when there is no Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return False
    try:
        result = subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,800",
                f"--screenshot={path}",
                url,
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and path.exists()


def quiet_row(watch: AlertWatch, quiet: tuple[float, float]) -> tuple[str, Any, bool]:
    """The verdict's line about the quiet period: no alert may fire in it."""
    noisy = watch.fired(*quiet)
    pending = sorted(
        {e.describe() for e in watch.pending_in(*quiet)} - {e.describe() for e in noisy}
    )
    return (
        f"alerts firing in the quiet period ({quiet[1] - quiet[0]:.0f} s of orders, no fault)",
        (", ".join(e.describe() for e in noisy) or "none")
        + (f" (went pending: {', '.join(pending)})" if pending else ""),
        not noisy,
    )


def watched_rows(watch: AlertWatch, watched: list[Watched]) -> list[tuple[str, Any, bool]]:
    """The verdict's alert lines: one per alert a watched fault must fire."""
    rows: list[tuple[str, Any, bool]] = []
    for fault in watched:
        for name, labels in fault.expected:
            bound = fire_bound(name, labels)
            episode = watch.first_firing(fault.started, name, **labels)
            shown = Episode(name, labels, 0).describe()
            if episode is None or episode.firing_at is None:
                rows.append((f"alert {shown} ({fault.what})", "never fired", False))
                continue
            to_fire = episode.firing_at - fault.started
            if episode.gone_at is None:
                resolved, resolved_ok = "still firing", False
            else:
                after = episode.gone_at - fault.recovered
                resolved, resolved_ok = (
                    f"resolved {after:.0f} s after recovery",
                    after <= RESOLVE_BOUND,
                )
            rows.append(
                (
                    f"alert {shown} ({fault.what}): fired within {bound:.0f} s, resolved within"
                    f" {RESOLVE_BOUND:.0f} s",
                    f"fired after {to_fire:.0f} s, {resolved}",
                    to_fire <= bound and resolved_ok,
                )
            )
    return rows
