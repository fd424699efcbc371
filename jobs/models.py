import uuid

from django.db import models


class OutboxMessage(models.Model):
    """A task to publish, written in the same transaction as the change that asked for it.

    The row is the durable promise; the broker message is its delivery. A row with
    `sent_at` NULL has not been handed to the broker yet and the relay will publish it.
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
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # The relay's only query: unsent rows, oldest first. Partial, so it stays as
            # small as the backlog, not as large as the history.
            models.Index(
                fields=["id"],
                name="outbox_unsent_idx",
                condition=models.Q(sent_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        state = "sent" if self.sent_at else "unsent"
        return f"{self.task_name} {self.task_id} ({state})"
