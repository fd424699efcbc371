"""The reconciler: checks of business outcomes, not of queues.

A queue dashboard can look healthy while customers get two receipts or none. A check
looks at the outcome (rows, the payment processor's ledger) and returns what is wrong;
when asked to repair, it re-enqueues what is safe to re-enqueue (idempotent tasks,
through the outbox) and only reports the rest. The project registers its checks:

    @reconciler.register("paid_without_receipt", "Paid orders whose receipt was not sent")
    def paid_without_receipt(*, repair: bool) -> Result: ...

`manage.py reconcile` runs them on demand, beat periodically; each check's last result
is kept (ReconciliationFinding) and exported as `jobs_reconciliation_gap{check=...}`.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from django.utils import timezone

from jobs.errors import TransientError
from jobs.models import ReconciliationFinding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    found: int
    repaired: int = 0
    samples: list[str] = field(default_factory=list)  # a few ids to look at, not all


CheckFunction = Callable[..., Result]


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    run: CheckFunction


class Reconciler:
    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    def register(self, name: str, description: str) -> Callable[[CheckFunction], CheckFunction]:
        def decorate(function: CheckFunction) -> CheckFunction:
            self.checks[name] = Check(name, description, function)
            return function

        return decorate

    def run(self, *, repair: bool = True) -> list[ReconciliationFinding]:
        """Run every check; a check that raises is recorded as such, the others still run."""
        findings = []
        for check in self.checks.values():
            fields: dict[str, object] = {"description": check.description}
            try:
                result = check.run(repair=repair)
            except Exception as exc:
                # A dependency that is down is expected; a traceback is for the unexpected.
                expected = isinstance(exc, TransientError)
                logger.warning(
                    "reconcile: check %s could not run: %r", check.name, exc, exc_info=not expected
                )
                # Not "found nothing": the last findings stay, and the error says that the
                # check is blind now (jobs_reconciliation_check_failed, and its alert).
                fields["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            else:
                fields |= {
                    "found": result.found,
                    "repaired": result.repaired,
                    "samples": result.samples[:20],
                    "error": "",
                }
                if result.found:
                    logger.warning(
                        "reconcile: %s found %d, repaired %d",
                        check.name,
                        result.found,
                        result.repaired,
                    )
            finding, _ = ReconciliationFinding.objects.update_or_create(
                check_name=check.name, defaults=fields | {"checked_at": timezone.now()}
            )
            findings.append(finding)
        return findings


reconciler = Reconciler()
