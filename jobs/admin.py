import json
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.translation import ngettext

from jobs.dead_letters import Handled, dead_letter_discard, dead_letter_replay
from jobs.models import DeadLetter, OutboxMessage


class ActionsRefusedLoudly(admin.ModelAdmin):
    """Django silently ignores a posted action the user may not run; this says it: 403."""

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        action = request.POST.get("action")
        if action in (self.actions or ()) and action not in self.get_actions(request):
            raise PermissionDenied(f"You may not run {action!r}.")
        return super().changelist_view(request, extra_context)


class NeverDeleted(admin.ModelAdmin):
    """Rows that are work or evidence: deleting one loses committed work or skips the audit.

    Without the delete permission Django offers neither the delete page (403) nor the
    "delete selected" action; each admin's own actions are the ways out.
    """

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ReadOnly(NeverDeleted):
    """Rows that only the code writes (a state machine, evidence): the admin shows them
    and offers its actions, but has no add page (a hand-made row breaks the invariants
    the code keeps, or a constraint: a 500) and no save (a form saved late would write
    back the state it loaded over what happened meanwhile)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnly):
    """The outbox is written by enqueue() and drained by the relay (sent rows are pruned
    after retention; an unsent row is a task not published yet)."""

    list_display = ["id", "task_name", "task_id", "created_at", "sent_at", "attempts"]
    list_filter = ["task_name", ("sent_at", admin.EmptyFieldListFilter)]
    search_fields = ["task_id", "task_name"]


def _pre(text: str) -> str:
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


_SECTIONS: list[tuple[str | None, list[str]]] = [
    (None, ["task_name", "task_id", "queue", "status", "reason", "attempts"]),
    ("Arguments", ["args_pretty", "kwargs_pretty", "correlation_id"]),
    ("Failure", ["exception_class", "exception_message", "traceback_pretty"]),
    ("Times", ["first_failed_at", "last_failed_at"]),
    ("Audit", ["replay_of", "handled_by", "handled_at", "replay_task_id", "replay_outcome"]),
]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnly, ActionsRefusedLoudly):
    """Dead letters are evidence: every field is read-only, none is deleted; the actions
    change the state (discard, not delete, so the audit trail records who and when)."""

    list_display = [
        "id",
        "task_name",
        "queue",
        "reason",
        "status",
        "attempts",
        "exception_class",
        "last_failed_at",
        "replay_outcome",
    ]
    list_filter = ["status", "reason", "queue", "task_name", "replay_outcome", "last_failed_at"]
    search_fields = ["task_id", "task_name", "exception_message", "correlation_id"]
    date_hierarchy = "last_failed_at"
    actions = ["replay_selected", "discard_selected"]
    fieldsets = [(title, {"fields": tuple(fields)}) for title, fields in _SECTIONS]
    readonly_fields = [name for _, fields in _SECTIONS for name in fields]

    @admin.display(description="args")
    def args_pretty(self, obj: DeadLetter) -> str:
        return _pre(json.dumps(obj.args, indent=2))

    @admin.display(description="kwargs")
    def kwargs_pretty(self, obj: DeadLetter) -> str:
        return _pre(json.dumps(obj.kwargs, indent=2))

    @admin.display(description="traceback")
    def traceback_pretty(self, obj: DeadLetter) -> str:
        return _pre(obj.traceback)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("jobs.replay_deadletter")

    def has_discard_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("jobs.discard_deadletter")

    def _report(self, request: HttpRequest, result: Handled, verb: str) -> None:
        if result.done:
            message = ngettext(
                "%(count)d dead letter %(verb)s.", "%(count)d dead letters %(verb)s.", result.done
            ) % {"count": result.done, "verb": verb}
            self.message_user(request, message, messages.SUCCESS)
        if result.refused:
            message = ngettext(
                "%(count)d was not %(verb)s: only dead letters in state 'dead' can be.",
                "%(count)d were not %(verb)s: only dead letters in state 'dead' can be.",
                result.refused,
            ) % {"count": result.refused, "verb": verb}
            self.message_user(request, message, messages.WARNING)
        for error in result.errors:
            self.message_user(request, error, messages.ERROR)

    @admin.action(description="Replay selected dead letters", permissions=["replay"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        self._report(
            request, dead_letter_replay(ids=ids, actor=request.user.get_username()), "replayed"
        )

    @admin.action(description="Discard selected dead letters", permissions=["discard"])
    def discard_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        self._report(
            request, dead_letter_discard(ids=ids, actor=request.user.get_username()), "discarded"
        )
