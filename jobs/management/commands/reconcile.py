from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.reconcile import reconciler


class Command(BaseCommand):
    help = "Check business outcomes; re-enqueue what is safe, report the rest."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="report only, repair nothing")

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        failed = []
        for finding in reconciler.run(repair=not dry_run):
            line = f"{finding.check_name}: found {finding.found}, repaired {finding.repaired}"
            if finding.samples:
                line += f" (e.g. {', '.join(map(str, finding.samples[:5]))})"
            if finding.error:
                line += f" ERROR {finding.error}"
                failed.append(finding.check_name)
            self.stdout.write(line)
        if failed:  # every check ran; a script or cron job still hears that one could not
            raise CommandError(f"{len(failed)} check(s) could not run: {', '.join(failed)}")
