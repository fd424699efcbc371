"""The Operations page's data: the same state the /metrics scrape reads, as tables."""

from collections import defaultdict
from dataclasses import dataclass, field

from jobs.metrics import StateCollector
from jobs.models import ReconciliationFinding


@dataclass
class QueueRow:
    name: str
    depth: float = 0
    oldest_age: float = 0
    unacked: float = 0
    oldest_unacked_age: float = 0
    consumers: float = 0
    canary_age: float = float("inf")


@dataclass
class DependencyRow:
    name: str
    breaker: str = "closed"  # closed | half_open | open
    rate_limit: float = 0  # calls per second for all workers (0: none)


@dataclass
class Snapshot:
    queues: list[QueueRow]
    dead_letters: dict[str, dict[str, int]]  # reason -> status -> count
    outbox_unsent: int
    outbox_oldest_age: float
    findings: list[ReconciliationFinding]
    dependencies: list[DependencyRow] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # parts that could not be read


_QUEUE_FIELDS = {
    "jobs_queue_depth": "depth",
    "jobs_queue_oldest_age_seconds": "oldest_age",
    "jobs_unacked": "unacked",
    "jobs_unacked_oldest_age_seconds": "oldest_unacked_age",
    "jobs_queue_consumers": "consumers",
    "jobs_canary_age_seconds": "canary_age",
}


def snapshot() -> Snapshot:
    queues: dict[str, QueueRow] = {}
    letters: dict[str, dict[str, int]] = defaultdict(dict)
    scalars: dict[str, float] = {}
    unreadable: list[str] = []
    dependencies: dict[str, DependencyRow] = {}
    for family in StateCollector().collect():
        for sample in family.samples:
            labels = sample.labels
            if family.name in _QUEUE_FIELDS:
                row = queues.setdefault(labels["queue"], QueueRow(labels["queue"]))
                setattr(row, _QUEUE_FIELDS[family.name], sample.value)
            elif family.name == "jobs_dead_letters":
                letters[labels["reason"]][labels["status"]] = int(sample.value)
            elif family.name.startswith("jobs_dependency_"):
                name = labels["dependency"]
                dependency = dependencies.setdefault(name, DependencyRow(name))
                if family.name == "jobs_dependency_rate_limit":
                    dependency.rate_limit = sample.value
                elif sample.value:  # jobs_dependency_breaker_state: 1 for its state
                    dependency.breaker = labels["state"]
            elif family.name == "jobs_scrape_errors" and sample.value:
                unreadable.append(labels["part"])
            else:
                scalars[family.name] = sample.value
    return Snapshot(
        queues=sorted(queues.values(), key=lambda row: row.name),
        dead_letters=dict(letters),
        outbox_unsent=int(scalars.get("jobs_outbox_unsent", 0)),
        outbox_oldest_age=scalars.get("jobs_outbox_oldest_unsent_age_seconds", 0.0),
        findings=list(ReconciliationFinding.objects.all()),
        dependencies=sorted(dependencies.values(), key=lambda row: row.name),
        unreadable=unreadable,
    )
