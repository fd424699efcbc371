"""The CPU a deployment gives each process of the shop, given to the bench's stack too.

In Kubernetes every pod of `deploy/k8s/` runs in a cgroup of its own: its CPU request
becomes the group's weight (`cpu.shares`, 1,024 per core) and its limit a CFS quota (at
most `limit` cores in every 100 ms period). On one host the bench's processes would
otherwise share two cores as equals, so 10,000 queued sales reports could take the CPU a
charge needs (scenario 5). `CpuGroups` reads each Deployment's request and limit from
the manifests, and puts each of the bench's processes of that name into a cgroup set the
same way. The gateway, Redis and PostgreSQL stand for services outside the shop's pods
and stay outside.

It needs cgroup v1's cpu controller at /sys/fs/cgroup/cpu, writable (root); without it
the bench runs unweighted and its report says so.
"""

import contextlib
import re
from pathlib import Path
from typing import Any

import yaml

from deploy.stack import BASE_DIR

CONTROLLER = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000  # the kubelet's CFS period
OUTSIDE = {"gateway"}  # a stand-in for the processor: not one of the shop's pods


def cores(value: str | int | float) -> float:
    """A Kubernetes CPU quantity ("250m", "1", 0.5) in cores."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def manifest_cpu(folder: Path = BASE_DIR / "deploy" / "k8s") -> dict[str, tuple[float, float]]:
    """Each Deployment's CPU (request, limit) in cores, by name (`worker-payments`)."""
    found: dict[str, tuple[float, float]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
                continue
            [container] = doc["spec"]["template"]["spec"]["containers"]
            resources: dict[str, Any] = container["resources"]
            request, limit = resources["requests"]["cpu"], resources["limits"]["cpu"]
            found[doc["metadata"]["name"]] = (cores(request), cores(limit))
    return found


class CpuGroups:
    """One cgroup per process name under /sys/fs/cgroup/cpu/<stack>/, weighted and
    limited as its Deployment is."""

    def __init__(self, stack: str) -> None:
        self.root = CONTROLLER / stack
        self.cpu = {name: cpu for name, cpu in manifest_cpu().items() if name not in OUTSIDE}
        self.available = (CONTROLLER / "cgroup.procs").exists()
        if self.available:
            try:
                self.root.mkdir(exist_ok=True)
            except OSError:  # not root, or a read-only cgroup file system
                self.available = False

    def place(self, name: str, pid: int) -> None:
        """Move process `pid` (started as `name`) into its group; the children it forks
        later are born there. A name with no Deployment stays where it is."""
        # The naive pipeline's workers and a Deployment's replicas (worker-payments-2):
        # the same pods, each its own group.
        deployment = re.sub(r"-\d+$", "", name.replace("worker-naive-", "worker-"))
        if not self.available or deployment not in self.cpu:
            return
        request, limit = self.cpu[deployment]
        group = self.root / name
        group.mkdir(exist_ok=True)
        (group / "cpu.shares").write_text(str(max(2, round(request * 1024))))
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(limit * PERIOD_US)))
        (group / "cgroup.procs").write_text(str(pid))

    def describe(self) -> str:
        if not self.available:
            return "no cgroup cpu controller here: every process shares the CPU unweighted"
        groups = ", ".join(f"{n} {r:g}/{lim:g}" for n, (r, lim) in sorted(self.cpu.items()))
        return f"CPU as deploy/k8s gives it (request/limit, cores): {groups}"

    def close(self) -> None:
        """Remove the groups (their processes have exited)."""
        if not self.available:
            return
        # A group with a process still in it stays (until the next boot).
        with contextlib.suppress(OSError):
            for group in self.root.iterdir():
                if group.is_dir():
                    group.rmdir()
            self.root.rmdir()
