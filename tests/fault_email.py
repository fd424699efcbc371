"""An email backend for fault tests, loaded into a test worker with EMAIL_BACKEND.

KillAfterFirstSendBackend writes the message like Django's file backend, then, the first
time only (a marker file remembers), SIGKILLs its own process: the crash between "email
sent" and "receipt marked sent" that no try/except can see. SlowBackend is a mail server
that takes FAULT_MAIL_DELAY seconds to answer; RefusingBackend one that refuses.
"""

import os
import signal
import time
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


class SlowBackend(EmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        time.sleep(float(os.environ.get("FAULT_MAIL_DELAY", "2")))
        return super().send_messages(email_messages)


class RefusingBackend(EmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        raise ConnectionRefusedError("the mail server refused the connection")
