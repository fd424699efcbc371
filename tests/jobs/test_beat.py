"""Beat stops on SIGTERM between ticks (jobs.celery._stop_between_ticks). The real beat
under its script, TERMed: tests/test_start_scripts.py."""

import signal
import threading
from types import SimpleNamespace

import pytest

from jobs.celery import _stop_between_ticks


def test_term_marks_beat_shut_down_and_leaves_its_store_open_for_the_loop_to_save():
    closed: list[bool] = []
    service = SimpleNamespace(_is_shutdown=threading.Event(), sync=lambda: closed.append(True))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        _stop_between_ticks(sender=service)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(SystemExit):
            handler(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])

    # Even if the SystemExit is lost mid-tick, the loop stops at its next check; the
    # store is saved and closed once, by beat's own `finally`, not in the handler.
    assert service._is_shutdown.is_set()
    assert closed == []
