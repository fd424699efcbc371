"""A module for the mutation run's own check (tests/test_mutation.py): one function its
tests call in the test process, one only a subprocess calls, one whose only mutant is
equivalent, one no test calls."""


def doubled(amount: int | None) -> int:
    return amount + amount if amount else 0


def is_large(amount: int) -> bool:
    return amount > 10


def unchanged(amount: int) -> int:
    return amount - 0


def never_called() -> bool:
    return True
