import json
from typing import Any, cast

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import connections, router
from django.db.models import Field, Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.translation import ngettext

from jobs.celery import app
from jobs.dead_letters import Handled, dead_letter_discard, dead_letter_replay
from jobs.models import DeadLetter, OutboxMessage


def distinct_values(model: type[Model], field: str) -> list[Any]:
    """The distinct values of an indexed, non-null column, in order, each found in its
    index (a loose index scan: one short descent per value). `SELECT DISTINCT` reads the
    whole index instead, and the admin's own filter for a column ran it on every view of
    the list: 40 ms of every page at 100,000 dead letters (make bench, scenario 10)."""
    connection = connections[router.db_for_read(model)]
    table = connection.ops.quote_name(model._meta.db_table)
    concrete = cast("Field[Any, Any]", model._meta.get_field(field))
    column = connection.ops.quote_name(str(concrete.column))
    sql = (
        f"WITH RECURSIVE found (value) AS (SELECT MIN({column}) FROM {table}"  # noqa: S608
        f" UNION ALL SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > found.value)"
        " FROM found WHERE found.value IS NOT NULL)"
        " SELECT value FROM found WHERE value IS NOT NULL"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return [value for (value,) in cursor.fetchall()]


class IndexedValuesFilter(admin.AllValuesFieldListFilter):
    """Django's filter of a column's values (links to each), the values read from the
    column's index (`distinct_values`). The whole table's values, as Django's own filter
    shows them for an admin whose queryset is the whole table."""

    def __init__(
        self,
        field: "Field[Any, Any]",
        request: HttpRequest,
        params: dict[str, Any],
        model: type[Model],
        model_admin: "admin.ModelAdmin[Any]",
        field_path: str,
    ) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        # The values themselves serve as well as Django's queryset of them.
        self.lookup_choices = distinct_values(model, field_path)  # type: ignore[assignment]


class OutboxStateFilter(admin.SimpleListFilter):
    """What became of a row. `unsent` is what the relay will publish and the Operations
    page counts (not dead-lettered), read from the relay's own index: the `sent_at` empty
    filter it replaces counted and ordered a million rows of history to find them."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("unsent", "Unsent"), ("sent", "Sent"), ("dead_lettered", "Dead-lettered")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[OutboxMessage]
    ) -> QuerySet[OutboxMessage]:
        if self.value() == "unsent":
            return queryset.filter(sent_at__isnull=True, dead_lettered_at__isnull=True)
        if self.value() == "sent":
            return queryset.filter(sent_at__isnull=False)
        if self.value() == "dead_lettered":
            return queryset.filter(dead_lettered_at__isnull=False)
        return queryset


class OutboxTaskFilter(admin.SimpleListFilter):
    """The tasks this project registers, without a query: the outbox has no index on
    task names (each would cost every enqueue), and `SELECT DISTINCT` over it read every
    row on every view of the list. A row of a task no longer registered is found by the
    search."""

    title = "task name"
    parameter_name = "task_name"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = sorted(name for name in app.tasks if not name.startswith("celery."))
        return [(name, name) for name in names]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[OutboxMessage]
    ) -> QuerySet[OutboxMessage]:
        return queryset.filter(task_name=self.value()) if self.value() else queryset


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
    list_filter = [OutboxStateFilter, OutboxTaskFilter]
    search_fields = ["task_id", "task_name"]
    # A filtered list says "N results (Show all)" instead of counting the whole history
    # (a million rows, a week of checkouts) for "(N total)" on every view.
    show_full_result_count = False


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
    list_filter = [
        "status",
        "reason",
        ("queue", IndexedValuesFilter),
        ("task_name", IndexedValuesFilter),
        "replay_outcome",
        "last_failed_at",
    ]
    search_fields = ["task_id", "task_name", "exception_message", "correlation_id"]
    # No date hierarchy: to offer its years, months or days it reads the date of every
    # row on every view of the list (50 ms at 100,000 dead letters, with an index). The
    # `last_failed_at` filter (today, past 7 days, this month, this year) selects by date.
    # And one count per view, of the list as filtered: "N results (Show all)", not a
    # second count of the whole table for "(N total)".
    show_full_result_count = False
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
