"""The admin cannot lose work or stock: a product form saved late keeps the reservations
made meanwhile, stock moves only by atomic adjustments, and nothing that is work or
evidence (orders, payments, receipts, outbox rows, dead letters) can be deleted."""

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client

from jobs.models import DeadLetter, OutboxMessage
from shop.models import Order, Payment, Product, Receipt, StockAdjustment
from shop.services.catalog import StockWouldGoNegative, product_stock_adjust
from shop.services.checkout import checkout_complete, checkout_parse
from tests.helpers import run_concurrently

pytestmark = pytest.mark.django_db


def change_url(product: Product) -> str:
    return f"/admin/shop/product/{product.pk}/change/"


def as_loaded(response: Any) -> dict[str, Any]:
    """What the browser posts back untouched: every field of the form as it was shown."""
    form = response.context["adminform"].form
    values = {name: form[name].value() for name in form.fields}
    return {name: "" if value is None else value for name, value in values.items()}


def another(loaded: dict[str, Any]) -> dict[str, Any]:
    """The same form as a page opened again: its own one-time adjustment token."""
    return loaded | {"adjustment_token": str(uuid.uuid4())}


def order(sku: str, quantity: int) -> Order:
    request = checkout_parse(
        {
            "email": "ada@example.com",
            "card_token": "tok_visa",
            "items": [{"sku": sku, "quantity": quantity}],
        }
    )
    return checkout_complete(request=request).order


def stock(sku: str) -> int:
    return Product.objects.get(sku=sku).stock


@pytest.fixture
def operator(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


def test_a_stale_product_form_keeps_the_stock_reserved_meanwhile(operator, broker, products):
    mug = products["MUG"]
    loaded = as_loaded(operator.get(change_url(mug)))
    order("MUG", 3)  # an order placed while the operator was looking at the form
    assert stock("MUG") == 7

    response = operator.post(change_url(mug), loaded | {"name": "Big mug"})

    assert response.status_code == 302, response.context["adminform"].form.errors
    mug.refresh_from_db()
    assert (mug.name, mug.stock) == ("Big mug", 7)


def test_adjustments_apply_to_the_current_stock_and_never_make_it_negative(
    operator, broker, products
):
    mug = products["MUG"]
    loaded = as_loaded(operator.get(change_url(mug)))
    order("MUG", 3)

    added = operator.post(change_url(mug), another(loaded) | {"stock_adjustment": "5"})
    removed = operator.post(change_url(mug), another(loaded) | {"stock_adjustment": "-3"})

    assert (added.status_code, removed.status_code) == (302, 302)
    assert "+5 units: Mug (MUG) has 12 in stock now." in map(str, get_messages(added.wsgi_request))
    assert stock("MUG") == 10 - 3 + 5 - 3

    refused = operator.post(
        change_url(mug), another(loaded) | {"stock_adjustment": "-10", "name": "X"}
    )

    assert refused.status_code == 200  # the form again, with the error
    assert refused.context["adminform"].form.errors["stock_adjustment"] == [
        "Cannot remove 10 units: only 9 in stock."
    ]
    mug.refresh_from_db()
    assert (mug.name, mug.stock) == ("Mug", 9)  # nothing changed, not even the name

    invalid = operator.post(
        change_url(mug), another(loaded) | {"stock_adjustment": "5", "name": ""}
    )

    assert invalid.status_code == 200
    assert stock("MUG") == 9  # the rest of the form was invalid: no adjustment either


def test_one_adjustment_form_sent_twice_adjusts_once_and_is_recorded(operator, broker, products):
    mug = products["MUG"]
    form = as_loaded(operator.get(change_url(mug))) | {"stock_adjustment": "5"}

    first = operator.post(change_url(mug), form)
    again = operator.post(change_url(mug), form)  # a double click, back and resubmit

    assert first.status_code == 302
    assert again.status_code == 200  # the form again, saying so
    assert again.context["adminform"].form.errors["stock_adjustment"] == [
        "This change was already made (the form was sent twice); reload the page to make another."
    ]
    assert stock("MUG") == 15
    [adjustment] = StockAdjustment.objects.all()
    assert (adjustment.product_id, adjustment.delta, adjustment.actor) == (mug.pk, 5, "root")


def test_stock_is_set_when_adding_a_product_and_read_only_afterwards(operator, products):
    changing = operator.get(change_url(products["MUG"])).context["adminform"].form.fields
    adding = operator.get("/admin/shop/product/add/").context["adminform"].form.fields

    assert ("stock" in changing, "stock_adjustment" in changing) == (False, True)
    assert ("stock" in adding, "stock_adjustment" in adding) == (True, False)
    response = operator.post(
        "/admin/shop/product/add/",
        {"sku": "CAP", "name": "Cap", "description": "", "price": "9.00", "stock": "4"},
    )
    assert response.status_code == 302
    assert stock("CAP") == 4


@pytest.fixture
def evidence(broker, products) -> dict[str, Any]:
    """One row of every kind the admin must not delete."""
    placed = order("MUG", 1)
    letter = DeadLetter.objects.create(
        task_id="dead-1",
        task_name="shop.tasks.payments.charge_payment",
        queue="payments",
        reason=DeadLetter.Reason.RETRIES_EXHAUSTED,
        exception_class="GatewayUnavailable",
    )
    return {
        "jobs/outboxmessage": OutboxMessage.objects.get(),  # the order's charge, unsent
        "jobs/deadletter": letter,
        "shop/order": placed,
        "shop/payment": Payment.objects.get(order=placed),
        "shop/receipt": Receipt.objects.create(order=placed),
    }


@pytest.mark.parametrize(
    ("model", "ways_out"),
    [
        ("jobs/outboxmessage", []),  # the relay sends, retention prunes
        ("jobs/deadletter", ["replay_selected", "discard_selected"]),
        ("shop/order", ["cancel_selected"]),
        ("shop/payment", []),
        ("shop/receipt", []),
    ],
)
def test_work_and_evidence_cannot_be_deleted_from_the_admin(operator, evidence, model, ways_out):
    row = evidence[model]

    changelist = operator.get(f"/admin/{model}/")
    deleted = operator.post(f"/admin/{model}/{row.pk}/delete/", {"post": "yes"})

    assert changelist.status_code == 200
    action_form = changelist.context["action_form"]  # None when no action is left
    actions = [name for name, _ in action_form.fields["action"].choices] if action_form else []
    assert [name for name in actions if name] == ways_out
    assert b'value="delete_selected"' not in changelist.content
    assert deleted.status_code == 403
    assert type(row).objects.filter(pk=row.pk).exists()


def test_stock_adjust_adds_removes_and_refuses_to_go_negative(products):
    mug = products["MUG"].pk

    assert product_stock_adjust(product_id=mug, delta=5) == 15
    assert product_stock_adjust(product_id=mug, delta=-15) == 0
    with pytest.raises(StockWouldGoNegative, match="Cannot remove 1 unit: only 0 in stock"):
        product_stock_adjust(product_id=mug, delta=-1)
    assert stock("MUG") == 0
    with pytest.raises(Product.DoesNotExist):
        product_stock_adjust(product_id=mug + 1000, delta=1)


@pytest.mark.django_db(transaction=True)
def test_concurrent_adjustments_all_count_and_never_take_stock_below_zero(products):
    mug, tee = products["MUG"].pk, products["TEE"].pk
    results: list[int] = []

    added = run_concurrently(lambda: product_stock_adjust(product_id=tee, delta=1), times=8)
    removed = run_concurrently(
        lambda: results.append(product_stock_adjust(product_id=mug, delta=-6)), times=2
    )

    assert added == []
    assert stock("TEE") == 18  # no adjustment lost
    assert results == [4]
    assert [type(error) for error in removed] == [StockWouldGoNegative]  # exactly one refused
    assert stock("MUG") == 4


@pytest.mark.parametrize("model", ["shop/order", "shop/payment", "shop/receipt", "jobs/deadletter"])
def test_rows_only_the_code_writes_have_no_add_page_and_no_save(operator, broker, products, model):
    placed = order("MUG", 1)
    Receipt.objects.create(order=placed)
    DeadLetter.objects.create(task_id="t", task_name="x", args=[1], reason="retries_exhausted")
    row = {
        "shop/order": placed,
        "shop/payment": placed.payment,
        "shop/receipt": placed.receipt,
        "jobs/deadletter": DeadLetter.objects.get(),
    }[model]
    before = {f.name: getattr(row, f.attname) for f in row._meta.concrete_fields}

    add = operator.post(f"/admin/{model}/add/", {})
    view = operator.get(f"/admin/{model}/{row.pk}/change/")
    save = operator.post(f"/admin/{model}/{row.pk}/change/", {"status": "pending"})

    assert add.status_code == 403
    assert view.status_code == 200  # still shown, read-only
    assert save.status_code == 403
    row.refresh_from_db()
    assert {f.name: getattr(row, f.attname) for f in row._meta.concrete_fields} == before
