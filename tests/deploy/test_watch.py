"""The lab's Prometheus runs the project's rules on a faster clock (deploy/watch.py), and
the lab judges alert episodes read from Prometheus's API (deploy/lab_alerts.py)."""

import re
import shutil
import subprocess

import pytest
import yaml

from deploy.lab_alerts import SLACK, AlertWatch, Episode, Watched, fire_bound, watched_rows
from deploy.watch import RULES, duration, scaled_rules


def rules_by_name(document: dict) -> dict[str, dict]:
    return {
        rule.get("alert", rule.get("record")): rule
        for group in document["groups"]
        for rule in group["rules"]
    }


def test_the_labs_rules_are_the_projects_with_every_duration_ten_times_shorter():
    shipped = rules_by_name(yaml.safe_load(RULES.read_text()))
    scaled = rules_by_name(scaled_rules(10))

    assert set(scaled) == set(shipped)
    assert scaled["JobsWorkerOffline"]["for"] == "12s"  # 2m
    assert scaled["JobsDeadLetters"]["for"] == "30s"  # 5m
    queue_too_old = scaled["JobsQueueTooOld"]["expr"]
    assert 'queue="payments"} > 6\n' in queue_too_old  # 60 s
    assert 'queue="reports"} > 180\n' in queue_too_old  # 1800 s
    assert "jobs_canary_age_seconds > 12" in scaled["JobsCanaryStale"]["expr"]
    assert "[90s]" in scaled["JobsFailureRatio"]["expr"]  # [15m]
    assert "> 0.05" in scaled["JobsFailureRatio"]["expr"]  # a ratio: not a duration
    assert "> 1" in scaled["JobsTaskSlow"]["expr"]  # a run time: the lab's are real
    for name, rule in shipped.items():
        # what scaled_rules leaves alone must not be there: offsets, subqueries
        assert "offset" not in rule["expr"]
        assert not re.search(r"\[\w+:\w*\]", rule["expr"])
        assert scaled[name].get("labels") == rule.get("labels")
        assert scaled[name].get("annotations") == rule.get("annotations")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing")
def test_the_labs_rules_are_valid(tmp_path):
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(scaled_rules(10)))

    checked = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_bound_to_fire_is_the_scaled_for_and_age_threshold_of_the_queue_plus_slack():
    assert fire_bound("JobsWorkerOffline", {"queue": "emails"}) == 12 + SLACK
    assert fire_bound("JobsQueueTooOld", {"queue": "payments"}) == 12 + 6 + SLACK
    assert fire_bound("JobsQueueTooOld", {"queue": "reports"}) == 12 + 180 + SLACK
    assert fire_bound("JobsOutboxBacklog", {}) == 12 + 12 + SLACK


def test_an_alert_is_judged_on_its_episode_after_the_fault_started():
    watch = AlertWatch(prometheus=None)  # type: ignore[arg-type]
    earlier = Episode("JobsWorkerOffline", {"queue": "emails"}, 0, firing_at=5, gone_at=20)
    this = Episode("JobsWorkerOffline", {"queue": "emails"}, 110, firing_at=125, gone_at=150)
    other = Episode("JobsWorkerOffline", {"queue": "payments"}, 100, firing_at=101)
    watch.episodes = [earlier, this, other]
    fault = Watched("worker_down", "a worker down", [("JobsWorkerOffline", {"queue": "emails"})])
    fault.started, fault.recovered = 100.0, 130.0

    ((_, value, ok),) = watched_rows(watch, [fault])

    assert watch.first_firing(100, "JobsWorkerOffline", queue="emails") is this
    assert watch.fired(0, 10) == [earlier]
    assert value == "fired after 25 s, resolved 20 s after recovery"
    assert ok
    this.firing_at = 100 + fire_bound("JobsWorkerOffline", {"queue": "emails"}) + 1
    assert not watched_rows(watch, [fault])[0][2]  # too late
    this.firing_at, this.gone_at = 125, None
    assert watched_rows(watch, [fault])[0][1:] == ("fired after 25 s, still firing", False)


def test_durations_stay_whole_seconds_or_milliseconds_prometheus_accepts():
    assert duration(12.0) == "12s"
    assert duration(17.142857) == "17143ms"
    assert rules_by_name(scaled_rules(7))["JobsQueueTooOld"]["for"] == "17143ms"  # 2m / 7
