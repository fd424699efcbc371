"""`make chaos` refuses nonsense before starting anything."""

import os
import re

import pytest

from tests.helpers import drop_database, run_module


@pytest.mark.parametrize(
    "args",
    [["--orders", "0"], ["--declined-share", "2"], ["--nope"], ["--watch", "worker_gone"]],
)
def test_chaos_usage_errors_start_nothing(args):
    result = run_module("deploy.chaos", *args, timeout=60)

    assert result.returncode == 2
    assert "usage: chaos.py" in result.stderr
    assert "lab in" not in result.stdout


@pytest.mark.stack
def test_a_small_lab_run_keeps_every_invariant():
    """The lab itself, small: 40 orders while a child, the payments children mid-charge,
    the web workers after COMMIT (Redis frozen), Redis (restarted) and the gateway
    (down longer than the old retry budget; then rejecting requests, so some charges are
    dead-lettered) fail, an operator replays and discards dead letters, cancels an order
    and saves a stale product form, outbox rows are published twice at once, and Redis
    turns slow; then the replay step, and the emails worker held down until Prometheus
    fires its alerts. Before the faults, a quiet period in which no alert may fire."""
    database = f"postgres://postgres@127.0.0.1:5432/test_chaos_{os.getpid()}"
    faults = "kill_mid_charge,kill_web_after_commit,restart_broker,gateway_outage,kill_child,"
    faults += "gateway_rejects,operator_decisions,stale_product_edit,duplicate_delivery,"
    faults += "slow_broker"
    args = ["--orders", "40", "--concurrency", "8", "--seed", "3", "--faults", faults]
    args += ["--fault-every", "1", "--chaos-seconds", "12", "--outage-seconds", "2"]
    args += ["--gateway-outage-seconds", "6", "--settle-timeout", "240"]
    args += ["--watch", "worker_down", "--quiet-seconds", "15"]
    try:
        result = run_module("deploy.chaos", *args, "--database-url", database, timeout=600)
    finally:
        drop_database(database)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdicts = result.stdout.split("chaos: gateway fixed")
    assert len(verdicts) == 2  # the verdict, the replay step, the verdict again
    assert re.search(r"ok +lost \(accepted, no receipt, no dead letter\) +0\n", verdicts[0])
    assert re.search(r"ok +accepted orders waiting in the dead letters \S+ +0\n", verdicts[1])
    assert re.search(r"ok +stock conserved .+ every product", verdicts[1])
    assert re.search(r"ok +gateway never above its limit \(40/s", verdicts[0])
    assert re.search(r"ok +gateway calls during each outage .+\)  +\d+(, \d+)*\n", verdicts[0])
    assert re.search(r"ok +alerts firing in the quiet period \(1\d s .+\)  +none\n", verdicts[0])
    for alert in ("JobsWorkerOffline", "JobsCanaryStale"):
        line = rf"ok +alert {alert}{{queue=emails}} \(the emails worker killed and kept down\)"
        assert re.search(
            line + r".+  fired after \d+ s, resolved \d+ s after recovery\n", verdicts[1]
        )
    assert "BAD" not in result.stdout
    assert "chaos: every invariant holds" in result.stdout


def test_the_published_twice_witness_counts_only_first_publishes():
    from deploy.chaos import first_publish

    assert first_publish({"uuid": "a", "retries": 0, "eta": None})  # after commit, or relay
    assert not first_publish({"uuid": "a", "retries": 1, "eta": "2026-12-01T00:00:01"})
    # A deferral under the rate limit: the same attempt (retries 0) again, with an ETA.
    assert not first_publish({"uuid": "a", "retries": 0, "eta": "2026-12-01T00:00:01"})


def test_the_witness_allows_two_publishes_per_row_plus_the_labs_own_duplicates():
    from collections import Counter

    from deploy.chaos import over_published

    sent = ["web pid 1 at 10:00:00", "beat pid 2 at 10:00:03"]  # after commit, relay
    publishes = {
        "relayed": sent,
        "thrice": [*sent, "beat pid 2 at 10:00:05"],
        # duplicate_delivery chose the newest row twice after the load: 4 of its own.
        "chosen-twice": [*sent, *["lab pid 3 at 10:01:00"] * 4],
        "chosen-once-sent-thrice": [*sent, sent[1], *["lab pid 3 at 10:01:00"] * 2],
    }
    duplicated = Counter({"chosen-twice": 2, "chosen-once-sent-thrice": 1})

    over = over_published(
        ["relayed", "thrice", "chosen-twice", "chosen-once-sent-thrice"], publishes, duplicated
    )

    assert over == {
        "thrice": publishes["thrice"],
        "chosen-once-sent-thrice": publishes["chosen-once-sent-thrice"],
    }
