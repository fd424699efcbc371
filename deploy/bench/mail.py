"""The bench's email backend: Django's file backend behind a mail server's latency.

A real SMTP relay takes 50-200 ms to accept a message. The bench sets the latency at run
time by writing milliseconds to `<EMAIL_FILE_PATH>/../mail-latency-ms` (no file: none),
read at each send, so one worker serves runs with and without it.
"""

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.filebased import EmailBackend


def latency_file() -> Path:
    return Path(settings.EMAIL_FILE_PATH).parent / "mail-latency-ms"


class LatencyFileBackend(EmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        with contextlib.suppress(FileNotFoundError, ValueError):  # none set: no latency
            time.sleep(float(latency_file().read_text()) / 1000)
        return super().send_messages(email_messages)
