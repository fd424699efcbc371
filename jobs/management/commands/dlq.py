"""`manage.py dlq list|show|replay|discard|prune`: the dead-letter table for operators
without a browser. The same services as the admin actions, the same audit trail."""

import getpass
import re
from argparse import ArgumentParser
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from jobs.dead_letters import dead_letter_discard, dead_letter_prune, dead_letter_replay
from jobs.models import DeadLetter

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _since(value: str) -> datetime:
    """'90m', '2h', '3d', or an ISO date/datetime."""
    if match := re.fullmatch(r"(\d+)([smhd])", value):
        return timezone.now() - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    parsed = parse_datetime(value)
    if parsed is None and (day := parse_date(value)) is not None:
        parsed = datetime(day.year, day.month, day.day)
    if parsed is None:
        raise CommandError(f"--since: expected 90m, 2h, 3d or an ISO date, got {value!r}")
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def _add_filters(parser: ArgumentParser, status_default: str) -> None:
    parser.add_argument("--task", help="task name (exact)")
    parser.add_argument("--reason", choices=DeadLetter.Reason.values)
    parser.add_argument("--queue")
    parser.add_argument(
        "--status",
        choices=[*DeadLetter.Status.values, "all"],
        default=status_default,
        help=f"default: {status_default}",
    )
    parser.add_argument("--since", type=str, help="last failure at or after: 90m, 2h, 3d, ISO")


class Command(BaseCommand):
    help = "List, show, replay, discard and prune dead letters."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        listing = commands.add_parser("list", help="list dead letters (newest first)")
        _add_filters(listing, "dead")
        listing.add_argument("--limit", type=int, default=50)
        show = commands.add_parser("show", help="one dead letter, with its traceback")
        show.add_argument("id", type=int)
        for name, verb in (("replay", "publish again"), ("discard", "mark discarded")):
            sub = commands.add_parser(name, help=f"{verb}: the ids given, or all matching")
            sub.add_argument("ids", nargs="*", type=int, metavar="ID")
            _add_filters(sub, "dead")
            sub.add_argument("--all", action="store_true", help="every matching row")
            sub.add_argument("--dry-run", action="store_true", help="count, change nothing")
        prune = commands.add_parser("prune", help="delete old replayed/discarded rows")
        prune.add_argument("--older-than-days", type=int, default=None)

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action == "list":
            self._list(self._select(options)[: options["limit"]])
        elif action == "show":
            self._show(options["id"])
        elif action in {"replay", "discard"}:
            self._handle_rows(action, options)
        else:
            count = dead_letter_prune(older_than_days=options["older_than_days"])
            self.stdout.write(f"pruned {count} dead letter(s)")

    def _select(self, options: dict[str, Any]) -> QuerySet[DeadLetter]:
        rows = DeadLetter.objects.order_by("-last_failed_at")
        if options.get("ids"):
            rows = rows.filter(pk__in=options["ids"])
        for field in ("task", "reason", "queue"):
            if options.get(field):
                rows = rows.filter(**{"task_name" if field == "task" else field: options[field]})
        if options.get("status", "all") != "all":
            rows = rows.filter(status=options["status"])
        if options.get("since"):
            rows = rows.filter(last_failed_at__gte=_since(options["since"]))
        return rows

    def _list(self, rows: QuerySet[DeadLetter]) -> None:
        self.stdout.write(
            f"{'ID':>6}  {'REASON':<17} {'STATUS':<9} {'TRIES':>5}  {'LAST FAILURE':<19}  TASK"
        )
        for row in rows:
            self.stdout.write(
                f"{row.pk:>6}  {row.reason:<17} {row.status:<9} {row.attempts:>5}  "
                f"{row.last_failed_at:%Y-%m-%d %H:%M:%S}  {row.task_name} "
                f"({row.exception_class.rsplit('.', 1)[-1]}: {row.exception_message[:60]})"
            )

    def _show(self, pk: int) -> None:
        row = DeadLetter.objects.filter(pk=pk).first()
        if row is None:
            raise CommandError(f"no dead letter with id {pk}")
        for field in (
            "task_name", "task_id", "queue", "reason", "status", "attempts", "args", "kwargs",
            "correlation_id", "exception_class", "exception_message", "first_failed_at",
            "last_failed_at", "replay_of", "handled_by", "handled_at", "replay_task_id",
            "replay_outcome",
        ):  # fmt: skip
            self.stdout.write(f"{field + ':':<19}{getattr(row, field)}")
        self.stdout.write(f"traceback:\n{row.traceback}")

    def _handle_rows(self, action: str, options: dict[str, Any]) -> None:
        filtered = any(options.get(f) for f in ("ids", "task", "reason", "queue", "since"))
        if not filtered and not options["all"]:
            raise CommandError(
                f"say which rows to {action}: ids, --task/--reason/--queue/--since, or --all"
            )
        past = "replayed" if action == "replay" else "discarded"
        if options["ids"]:
            # An id that names no row is a typo or a row pruned meanwhile: refuse them all,
            # as `show` does, rather than report "0 replayed, refused 0" for it.
            found = set(
                DeadLetter.objects.filter(pk__in=options["ids"]).values_list("pk", flat=True)
            )
            if missing := sorted(set(options["ids"]) - found):
                listed = ", ".join(map(str, missing))
                raise CommandError(f"no dead letter with id {listed}; nothing was {past}")
        ids = list(self._select(options).values_list("pk", flat=True))
        if options["dry_run"]:
            self.stdout.write(f"would {action} {len(ids)} dead letter(s) (dry run)")
            return
        actor = f"cli:{getpass.getuser()}"
        service = dead_letter_replay if action == "replay" else dead_letter_discard
        result = service(ids=ids, actor=actor)
        self.stdout.write(f"{past} {result.done} dead letter(s), refused {result.refused}")
        for error in result.errors:
            self.stderr.write(error)
