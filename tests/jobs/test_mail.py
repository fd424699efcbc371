"""A mail server that answers every step slowly holds a plain SMTP send for the sum of
its steps; jobs.mail.DeadlineSMTPBackend ends it at the run's deadline."""

import smtplib
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from django.core.mail import EmailMessage, get_connection

from jobs import deadline

STEP = 0.6  # seconds the server waits before each reply; a send is 6 replies or more


class _SlowSMTP(socketserver.StreamRequestHandler):
    def reply(self, line: bytes) -> None:
        time.sleep(STEP)
        self.wfile.write(line + b"\r\n")

    def handle(self) -> None:
        self.reply(b"220 slow.example ESMTP")
        data = False
        for raw in self.rfile:
            line = raw.rstrip(b"\r\n")
            if data:
                if line == b".":
                    data = False
                    self.reply(b"250 queued")
                continue
            verb = line[:4].upper()
            if verb == b"DATA":
                data = True
                self.reply(b"354 go on")
            elif verb == b"QUIT":
                self.reply(b"221 bye")
                return
            else:
                self.reply(b"250 ok")


@pytest.fixture
def slow_smtp() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SlowSMTP)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def send(backend: str, port: int) -> None:
    connection = get_connection(backend, host="127.0.0.1", port=port, timeout=10)
    EmailMessage("s", "b", "from@example.com", ["to@example.com"], connection=connection).send()


def test_a_plain_smtp_send_outlasts_the_run_while_the_deadline_backend_ends_with_it(
    slow_smtp,
):
    budget = 2 * STEP + STEP / 2  # the greeting and one reply, not the whole exchange

    with deadline.running(budget):
        send("django.core.mail.backends.smtp.EmailBackend", slow_smtp)  # every step < 10 s

    with deadline.running(budget), pytest.raises((smtplib.SMTPException, OSError)):
        send("jobs.mail.DeadlineSMTPBackend", slow_smtp)


def test_outside_a_run_the_deadline_backend_is_djangos_smtp_backend(slow_smtp):
    send("jobs.mail.DeadlineSMTPBackend", slow_smtp)  # no deadline: the socket timeout only
