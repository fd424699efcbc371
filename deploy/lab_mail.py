"""The failure lab's email backend: Django's file backend with a trap the lab can arm.

`make chaos` aims one fault at the worst moment of a receipt: the email is written but
the Receipt row is not yet marked sent. To hit that moment on purpose, the lab creates
the file `<EMAIL_FILE_PATH>/../mail-trap` (the trap is armed); the next send that claims
the trap (one atomic rename, so one send only) writes its mail, leaves its pid in
`mail-trap.pid` and waits a few seconds, and the lab SIGKILLs that pid. Unarmed, a send
is the plain file backend.
"""

import os
import time
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.filebased import EmailBackend

TRAP_WAIT_SECONDS = 5.0


def trap_paths() -> tuple[Path, Path]:
    """(the armed trap, where the trapped sender leaves its pid)."""
    base = Path(settings.EMAIL_FILE_PATH).parent
    return base / "mail-trap", base / "mail-trap.pid"


class TrapFileBackend(EmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        sent = super().send_messages(email_messages)
        armed, pid_file = trap_paths()
        claimed = pid_file.with_suffix(f".{os.getpid()}")
        try:
            armed.rename(claimed)
        except FileNotFoundError:
            return sent  # not armed, or another send took the trap
        claimed.write_text(str(os.getpid()))
        claimed.rename(pid_file)
        time.sleep(TRAP_WAIT_SECONDS)  # the lab kills us here: sent, not marked
        return sent
