import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import outbox


class Command(BaseCommand):
    help = "Publish outbox rows that were committed but never reached the broker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="Only rows older than this many seconds (default: OUTBOX_RELAY_GRACE).",
        )
        parser.add_argument(
            "--loop",
            type=float,
            metavar="SECONDS",
            default=None,
            help="Keep relaying, pausing SECONDS between runs, until interrupted.",
        )

    def handle(self, *args: Any, grace: float | None, loop: float | None, **options: Any) -> None:
        if loop is not None and loop <= 0:
            raise CommandError("--loop needs a positive number of seconds.")
        while True:
            count = outbox.relay_all_unsent(older_than=grace)
            self.stdout.write(f"relayed {count} message(s)")
            if loop is None:
                return
            time.sleep(loop)
