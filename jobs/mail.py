"""Django's SMTP backend, each SMTP exchange step held to the run's deadline.

`EMAIL_TIMEOUT` is a socket timeout: it applies to each command and each reply line on
its own, so a mail server that answers slowly step by step (an exchange is seven or more
replies) holds a send for many times that. On a pool that enforces no time limits
(threads) nothing would stop it. This backend caps the socket's timeout, before every
command it sends and every reply line it reads, by what the run has left
(jobs.deadline): a send ends at the run's deadline, plus at most one line still arriving.
"""

import smtplib
import socket
from typing import Any

from django.core.mail.backends.smtp import EmailBackend

from jobs import deadline


class _CappedLines:
    """The reply stream smtplib reads line by line, each read capped by the deadline."""

    def __init__(self, smtp: smtplib.SMTP, sock: socket.socket) -> None:
        self._smtp, self._sock = smtp, sock
        self._file = sock.makefile("rb")

    def readline(self, size: int = -1) -> bytes:
        self._sock.settimeout(deadline.capped(self._smtp.timeout))
        return self._file.readline(size)

    def close(self) -> None:
        self._file.close()


class _DeadlineSMTP(smtplib.SMTP):
    timeout: float

    def send(self, s: Any) -> None:
        if self.sock is not None:
            self.sock.settimeout(deadline.capped(self.timeout))
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _CappedLines(self, self.sock)
        return super().getreply()


class _DeadlineSMTPSSL(smtplib.SMTP_SSL, _DeadlineSMTP):
    pass


class DeadlineSMTPBackend(EmailBackend):
    """`EMAIL_BACKEND = "jobs.mail.DeadlineSMTPBackend"`: Django's SMTP backend whose every
    command and reply line waits at most what the task's run has left."""

    @property
    def connection_class(self) -> type[smtplib.SMTP]:
        return _DeadlineSMTPSSL if self.use_ssl else _DeadlineSMTP
