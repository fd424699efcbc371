import uuid

from django.db import models


class OutboxMessage(models.Model):
    """A task to publish, written in the same transaction as the change that asked for it.

    The row is the durable promise; the broker message is its delivery. A row with
    `sent_at` NULL has not been handed to the broker yet and the relay will publish it,
    unless it failed to publish too often for a reason of its own (`dead_lettered_at`:
    the dead-letter table holds the job now, and an operator decides).
    The Celery task id is fixed when the row is written, so a row published twice is
    the same task twice, which the idempotent tasks and the result backend recognise.
    """

    task_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    task_name = models.CharField(max_length=200)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # Failures of this row itself (not "the broker is down"): each one backs the row off
    # until `retry_after`, so it never blocks the rows behind it; past
    # JOBS_OUTBOX_MAX_FAILURES it becomes a dead letter.
    failures = models.PositiveIntegerField(default=0)
    retry_after = models.DateTimeField(null=True, blank=True)
    dead_lettered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # The relay's only query: unsent rows, oldest first. Partial, so it stays as
            # small as the backlog, not as large as the history.
            models.Index(
                fields=["id"],
                name="outbox_unsent_idx",
                condition=models.Q(sent_at__isnull=True, dead_lettered_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        state = "sent" if self.sent_at else "unsent"
        return f"{self.task_name} {self.task_id} ({state})"


class DeadLetter(models.Model):
    """A task that failed for good: the job, why it died, and what was done about it.

    One row per original task id (unique), however often its failure is signalled.
    `dead` rows wait for an operator; `replayed` and `discarded` rows keep the audit
    trail until retention prunes them. `dead` rows are never pruned automatically.
    """

    class Reason(models.TextChoices):
        RETRIES_EXHAUSTED = "retries_exhausted", "Retries exhausted"
        PERMANENT_ERROR = "permanent_error", "Permanent error"
        WORKER_LOST = "worker_lost", "Worker lost"
        TIME_LIMIT = "time_limit", "Time limit"
        POISON = "poison", "Poison message"
        # The outbox could not publish it (e.g. routed to a queue that no longer exists).
        UNPUBLISHABLE = "unpublishable", "Could not be published"

    class Status(models.TextChoices):
        DEAD = "dead", "Dead"
        REPLAYED = "replayed", "Replayed"
        DISCARDED = "discarded", "Discarded"

    class Outcome(models.TextChoices):
        NONE = "", "-"
        PENDING = "pending", "Pending"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed again"

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=200, db_index=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=100, blank=True, db_index=True)
    reason = models.CharField(max_length=30, choices=Reason.choices, db_index=True)
    exception_class = models.CharField(max_length=200, blank=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=1)
    correlation_id = models.CharField(max_length=100, blank=True, db_index=True)
    replay_of = models.CharField(max_length=255, blank=True, help_text="Task id this replayed.")
    first_failed_at = models.DateTimeField(auto_now_add=True, db_index=True)
    last_failed_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.DEAD, db_index=True
    )
    # The audit trail: who replayed or discarded it, when, and what became of the replay.
    handled_by = models.CharField(max_length=150, blank=True)
    handled_at = models.DateTimeField(null=True, blank=True)
    replay_task_id = models.CharField(max_length=255, blank=True, db_index=True)
    replay_outcome = models.CharField(
        max_length=20, choices=Outcome.choices, default=Outcome.NONE, blank=True
    )

    class Meta:
        ordering = ["-last_failed_at"]
        indexes = [
            # The newest first: the admin's list, `dlq list`, and `--since` (a range).
            models.Index(fields=["last_failed_at", "id"], name="deadletter_last_failed_idx"),
            # Counts by status and reason (/metrics, the Operations page, the admin's
            # filtered list) read this index alone, never the rows and their tracebacks;
            # the dead of one reason, newest first, is the Operations page's link.
            models.Index(
                fields=["status", "reason", "last_failed_at", "id"], name="deadletter_state_idx"
            ),
        ]
        permissions = [
            ("replay_deadletter", "Can replay dead letters"),
            ("discard_deadletter", "Can discard dead letters"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id} ({self.reason}, {self.status})"


class ReconciliationFinding(models.Model):
    """The last result of one reconciliation check: what it found and what it repaired."""

    check_name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=300)
    found = models.PositiveIntegerField(default=0)
    repaired = models.PositiveIntegerField(default=0)
    samples = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    checked_at = models.DateTimeField()

    class Meta:
        ordering = ["check_name"]

    def __str__(self) -> str:
        return f"{self.check_name}: {self.found} found, {self.repaired} repaired"
