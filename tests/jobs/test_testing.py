"""jobs.testing's helpers say what was enqueued, and fail with what was instead."""

import pytest
from django.db import transaction

from jobs.outbox import enqueue
from jobs.testing import assert_enqueued, assert_nothing_enqueued, enqueued

RECEIPT = "shop.tasks.emails.send_receipt"


@pytest.mark.django_db(transaction=True)
def test_the_helpers_see_committed_outbox_rows_and_say_what_they_found(broker):
    assert_nothing_enqueued()
    with transaction.atomic():
        enqueue(RECEIPT, args=[7])
        enqueue(RECEIPT, args=[8])

    [row] = assert_enqueued(RECEIPT, args=[7])
    assert row.args == [7]
    assert len(assert_enqueued(RECEIPT, count=2)) == 2
    assert [r.args for r in enqueued(RECEIPT)] == [[7], [8]]
    with pytest.raises(AssertionError, match=r"expected 1 x .* found 0: .*\[7\]"):
        assert_enqueued(RECEIPT, args=[9])
    with pytest.raises(AssertionError, match="send_receipt"):
        assert_nothing_enqueued(RECEIPT)
    assert_nothing_enqueued("shop.tasks.payments.charge_payment")
