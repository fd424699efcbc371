"""Flower shows the shop's work: jobs' housekeeping (the outbox relay, the canaries, the
pruning and the reconciler, all scheduled by beat) runs and sends no monitoring event,
and beat sends no `task-sent`; the shop's own periodic work is seen from its receipt."""

import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from jobs.canary import canary_ages
from tests.helpers import REPO, role_env, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

REPORT = "shop.tasks.reports.build_sales_report"


class TaskEvents:
    """Every task event on the broker while it listens: task id -> [(type, name)]."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.listening = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.thread.start()
        assert self.listening.wait(10)

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(timeout=10)

    def listen(self) -> None:
        from jobs import app

        def record(event: dict[str, Any]) -> None:
            if event["type"].startswith("task-"):
                self.seen[str(event["uuid"])].append((event["type"], event.get("name")))

        with app.connection_for_read() as connection:
            receiver = self.receiver = app.events.Receiver(connection, handlers={"*": record})
            declared = receiver.on_consume_ready

            def ready(*args: Any, **kwargs: Any) -> None:  # its queue is bound: listening
                declared(*args, **kwargs)
                self.listening.set()

            receiver.on_consume_ready = ready
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def names(self) -> dict[str, set[str]]:
        """Task name -> the kinds of events seen for its tasks (names come with
        `task-sent` and `task-received`; later events carry the task id alone)."""
        found: dict[str, set[str]] = defaultdict(set)
        for kinds in list(self.seen.values()):
            name = next((name for _, name in kinds if name), "(unnamed)")
            found[name] |= {kind for kind, _ in kinds}
        return found


def test_flower_sees_the_shops_periodic_work_and_none_of_the_housekeeping(
    broker, start_worker, worker_env: dict[str, str], tmp_path: Path
):
    events = TaskEvents()
    default, _ = start_worker("default"), start_worker("reports")
    beat_env = {
        **role_env(worker_env),
        "SHOP_VAR_DIR": str(tmp_path),
        "CANARY_INTERVAL": "1",
        "OUTBOX_RELAY_INTERVAL": "1",
        "RECONCILE_INTERVAL": "1",
        "SALES_REPORT_INTERVAL": "2",
    }
    with (tmp_path / "beat.log").open("wb") as log:
        beat = subprocess.Popen(
            [str(REPO / "deploy" / "bin" / "beat")], cwd=REPO, env=beat_env, stdout=log, stderr=log
        )
    try:
        # when: beat has sent the housekeeping and the report, and the workers ran them
        wait_until(
            lambda: "task-succeeded" in events.names().get(REPORT, set()),
            timeout=60,
            what="a sales report seen through its events",
        )
        wait_until(
            lambda: all(
                default.events("succeeded", f"jobs.tasks.{name}")
                for name in ("relay_outbox", "canary", "reconcile")
            ),
            timeout=30,
            what="the housekeeping run by the default worker",
        )
        assert max(canary_ages(["default", "reports"], now=time.time()).values()) < 5
    finally:
        beat.terminate()
        beat.wait(timeout=30)
        events.stop()

    # then: the report from its receipt on (beat sent it without a `task-sent`), and not
    # one event of the housekeeping, the worker's or beat's
    seen = events.names()
    assert seen[REPORT] >= {"task-received", "task-started", "task-succeeded"}
    assert "task-sent" not in seen[REPORT]
    assert set(seen) == {REPORT}, seen
