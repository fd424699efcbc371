"""`make bench` runs and reports. Speed itself is never asserted here (these machines are
shared and noisy): only that the harness measures every scenario and writes its report."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from deploy.bench.cpu import CpuGroups, cores, manifest_cpu
from deploy.bench.report import bars, summary, table, verdicts
from deploy.bench.scenarios import SCENARIOS as SCENARIO_NAMES
from deploy.bench.scenarios import Goal, Result
from deploy.stack import QUEUES
from tests.helpers import drop_database, run_module

SCENARIOS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}


@pytest.mark.parametrize(
    "args", [["--reps", "0"], ["--only", "checkout,nope"], ["--clients", "-1"], ["--nope"]]
)
def test_bench_usage_errors_start_nothing(args, tmp_path):
    result = run_module("deploy.bench", *args, "--out", str(tmp_path), timeout=60)

    assert result.returncode == 2
    assert "usage: make bench" in result.stderr
    assert "stack in" not in result.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.stack
def test_a_quick_bench_measures_every_scenario_and_writes_its_report(tmp_path):
    database = f"postgres://postgres@127.0.0.1:5432/test_bench_{os.getpid()}"
    args = ["--quick", "--out", str(tmp_path), "--database-url", database]
    try:
        result = run_module("deploy.bench", *args, timeout=600)
    finally:
        drop_database(database)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {s["number"] for s in report["scenarios"]} == SCENARIOS
    raw = json.loads((tmp_path / "raw.json").read_text())  # kept after each scenario
    assert {s["number"] for s in raw} == SCENARIOS
    for scenario in report["scenarios"]:
        assert scenario["repetitions"], scenario["title"]
        assert scenario["goals"] or scenario["number"] == 1, scenario["title"]  # 1: a figure
        for goal in scenario["goals"]:  # measured: a number, not NaN
            assert goal["median"] == goal["median"], (scenario["title"], goal)
    checkout = report["scenarios"][0]["summary"]
    assert checkout["checkout_per_s"]["median"] > 0
    assert checkout["checkout_errors"]["max"] == 0
    assert {"web worker", "payments child", "emails child"} <= set(report["peak_rss_mib"])
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "goal on_commit_throughput_ratio >= 0.9" in result.stdout
    assert (tmp_path / "bench.txt").read_text() in result.stdout
    stack = result.stdout.split("bench: stack in ", 1)[1].split()[0]
    assert not Path(stack).exists()  # a run that succeeded leaves no logs behind
    # Only the shop's own processes run when a scenario starts: the naive pipeline's
    # workers live inside scenario 6 (left idle, they held the database connections
    # scenario 11's four payments workers needed).
    starts = re.findall(r"^bench: \w+\.\.\. \(running: (.*)\)$", result.stdout, re.M)
    assert len(starts) == len(SCENARIO_NAMES), result.stdout[:3000]
    for running in starts:
        assert "worker-payments" in running.split(", "), running
        assert "naive" not in running, running
    limited = re.findall(r"(\d+) of (\d+) database connections in use", result.stdout)
    assert limited, result.stdout[-3000:]
    assert all(int(used) < int(most) for used, most in limited), limited


def test_the_bench_gives_its_processes_the_cpu_their_deployments_ask_for():
    cpu = manifest_cpu()

    # every process the bench starts has a Deployment to take its CPU from
    assert {"web", "beat", *(f"worker-{queue}" for queue in QUEUES)} <= set(cpu)
    assert cpu["worker-reports"] == (cores("250m"), cores("500m")) == (0.25, 0.5)
    assert all(0 < request <= limit for request, limit in cpu.values())


@pytest.mark.skipif(not CpuGroups("probe").available, reason="needs cgroup v1's cpu controller")
def test_a_process_placed_in_its_group_is_weighted_and_limited_as_its_deployment(tmp_path):
    groups = CpuGroups(f"bench-test-{os.getpid()}")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        groups.place("worker-reports", sleeper.pid)
        groups.place("redis", sleeper.pid)  # no Deployment: stays where it is

        group = groups.root / "worker-reports"
        assert (
            f":cpu:/{groups.root.name}/worker-reports"
            in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        )
        assert (group / "cpu.shares").read_text().strip() == str(round(0.25 * 1024))
        assert (group / "cpu.cfs_quota_us").read_text().strip() == "50000"  # 0.5 of 100 ms
    finally:
        sleeper.kill()
        sleeper.wait()
        groups.close()
    assert not groups.root.exists()


def test_a_goal_on_pooled_samples_shows_the_range_of_its_figure_per_repetition():
    """Scenario 5's goal is one ratio over every repetition's waits pooled, copied into
    each repetition: its own min and max are that value, so the report shows the range of
    the per-repetition ratio beside it, in the table and as the chart's whisker."""
    goal = Goal("pooled_p99_ratio", "<=", 1.5, spread="p99_ratio")
    result = Result(5, "isolation", [goal])
    result.reps = [{"p99_ratio": ratio, "pooled_p99_ratio": 1.2} for ratio in (0.75, 1.0, 3.0)]
    info = {"date": "today", "cpus": 2, "cpu": "x", "python": "3", "celery": "5", "django": "5"}

    assert "p99_ratio per repetition 0.75-3.00" in table([result], {}, info)
    [bar] = bars([result])
    assert bar.label == "5. pooled_p99_ratio <= 1.5 (pooled)"
    assert bar.score == pytest.approx(1.5 / 1.2)
    assert bar.score - bar.below == pytest.approx(1.5 / 3.0)  # the worst repetition
    assert bar.score + bar.above == pytest.approx(1.5 / 0.75)  # the best one
    assert bar.met


def test_a_figure_measured_with_one_repetition_only_is_summarized_and_checked():
    """Scenario 11 measures its replay once, with the last repetition: a full run (three
    repetitions) died on it in its report, after an hour of measuring."""
    result = Result(11, "limits", [Goal("drain", ">=", 0.9), Goal("replay", "<=", 1.0)])
    result.reps = [{"drain": 0.8}, {"drain": 1.0}, {"drain": 0.95, "replay": 1.06}]

    stats = summary(result)

    assert stats["drain"] == {"median": 0.95, "min": 0.8, "max": 1.0}
    assert stats["replay"] == {"median": 1.06, "min": 1.06, "max": 1.06}
    assert verdicts(result) == [("drain >= 0.9", 0.95, True), ("replay <= 1", 1.06, False)]
    info = {"date": "today", "cpus": 2, "cpu": "x", "python": "3", "celery": "5", "django": "5"}
    assert "goal replay <= 1" in table([result], {}, info)
