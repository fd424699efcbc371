"""A module for the mutation run's own check (tests/test_mutation.py): one function its
tests call in the test process, one only a subprocess calls, one whose only mutant is
equivalent, one no test calls, and one Cosmic Ray cannot mutate."""

import binascii
import json


def doubled(amount: int | None) -> int:
    return amount + amount if amount else 0


def is_large(amount: int) -> bool:
    return amount > 10


def unchanged(amount: int) -> int:
    return amount - 0


def never_called() -> bool:
    return True


def loaded(text: str) -> object:
    """Cosmic Ray's exception operator fails on a dotted name in a tuple: not made."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, binascii.Error):
        raise
