"""An email backend for fault tests, loaded into a test worker with EMAIL_BACKEND.

It writes the message like Django's file backend, then, the first time only (a marker
file remembers), SIGKILLs its own process: the crash between "email sent" and "receipt
marked sent" that no try/except can see.
"""

import os
import signal
from collections.abc import Sequence
from pathlib import Path

from django.core.mail import EmailMessage
from django.core.mail.backends.filebased import EmailBackend


class KillAfterFirstSendBackend(EmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        sent = super().send_messages(email_messages)
        marker = Path(os.environ["FAULT_MARKER"])
        if not marker.exists():
            marker.write_text("killed once\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return sent
