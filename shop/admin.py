import logging
from collections import Counter
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import ngettext

from jobs.admin import ActionsRefusedLoudly, ReadOnly
from jobs.dependencies import operator_call
from jobs.errors import TransientError
from shop.models import Order, OrderLine, Payment, Product, Receipt, StockAdjustment
from shop.services.catalog import (
    AdjustmentAlreadyApplied,
    StockWouldGoNegative,
    product_stock_adjust,
)
from shop.services.orders import Cancelled, order_cancel, order_dead_letters_close

logger = logging.getLogger(__name__)
MESSAGE = "This order was cancelled by the shop."  # what the customer reads


def _counted(singular: str, plural: str) -> Callable[[int], str]:
    return lambda count: ngettext(singular, plural, count) % {"count": count}


# What an operator reads after cancelling: the gateway may have had the last word.
_REPORTS = {
    Cancelled.CANCELLED: _counted(
        "%(count)d order cancelled, its stock released.",
        "%(count)d orders cancelled, their stock released.",
    ),
    Cancelled.PAID: _counted(
        "%(count)d order was not cancelled: the gateway had charged it, so it is paid.",
        "%(count)d orders were not cancelled: the gateway had charged them, so they are paid.",
    ),
    Cancelled.DECLINED: _counted(
        "%(count)d order was not cancelled: the gateway had declined it, so it failed.",
        "%(count)d orders were not cancelled: the gateway had declined them, so they failed.",
    ),
    Cancelled.ALREADY_FINAL: _counted(
        "%(count)d order was not cancelled: it was no longer waiting for its payment.",
        "%(count)d orders were not cancelled: they were no longer waiting for their payment.",
    ),
}
_LEVELS = {
    Cancelled.CANCELLED: messages.SUCCESS,
    Cancelled.PAID: messages.WARNING,
    Cancelled.DECLINED: messages.WARNING,
    Cancelled.ALREADY_FINAL: messages.WARNING,
}


ADJUSTMENT = "stock_adjustment"
# The change form's own fields, not the product's: never saved on the row.
FORM_ONLY = (ADJUSTMENT, "adjustment_token")


class ProductChangeForm(forms.ModelForm):
    """Stock is changed by a number of units to add or remove, never by writing back the
    stock the form was loaded with: that would erase the orders placed since."""

    stock_adjustment = forms.IntegerField(
        label="Add or remove units",
        initial=0,
        required=False,
        min_value=-1_000_000,
        max_value=1_000_000,
        help_text="Negative removes units. Added to the stock as it is when you save, so "
        "orders placed meanwhile keep their units.",
    )
    # One per page shown: the same form sent twice adjusts once.
    adjustment_token = forms.UUIDField(widget=forms.HiddenInput, required=False, initial=uuid4)
    new_stock: int | None = None  # what the adjustment left, once applied
    actor = ""  # set per request by ProductAdmin.get_form

    def full_clean(self) -> None:
        """The adjustment comes last, once everything else is valid: its conditional
        UPDATE is the check, so a refusal is a form error and changes nothing. The admin
        saves in the same transaction, so a save that fails takes the adjustment back."""
        super().full_clean()
        if not self.is_bound or self.errors or not self.cleaned_data.get(ADJUSTMENT):
            return
        try:
            self.new_stock = product_stock_adjust(
                product_id=self.instance.pk,
                delta=self.cleaned_data[ADJUSTMENT],
                actor=self.actor,
                token=self.cleaned_data.get("adjustment_token"),
            )
        except (StockWouldGoNegative, AdjustmentAlreadyApplied) as refused:
            self.add_error(ADJUSTMENT, str(refused))


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    """A new product sets its initial stock; after that stock is read-only and moves only
    by atomic adjustments (ProductChangeForm)."""

    list_display = ["sku", "name", "price", "stock"]
    search_fields = ["sku", "name"]

    def get_readonly_fields(self, request: HttpRequest, obj: Product | None = None) -> list[str]:
        return [*super().get_readonly_fields(request, obj), *(["stock"] if obj else [])]

    def get_form(
        self, request: HttpRequest, obj: Product | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is not None:
            actor = request.user.get_username()
            kwargs["form"] = type("ProductChangeForm", (ProductChangeForm,), {"actor": actor})
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Product | None = None) -> list[Any]:
        """The adjustment right under the stock it changes."""
        fields = [name for name in super().get_fields(request, obj) if name not in FORM_ONLY]
        return fields if obj is None else [*fields, *FORM_ONLY]

    def save_model(
        self, request: HttpRequest, obj: Product, form: forms.ModelForm, change: bool
    ) -> None:
        if not change:
            super().save_model(request, obj, form, change)
            return
        # Only what the operator changed: a full save would write back the stale stock.
        obj.save(update_fields=[name for name in form.changed_data if name not in FORM_ONLY])
        assert isinstance(form, ProductChangeForm)
        delta = form.cleaned_data.get(ADJUSTMENT)
        if delta and form.new_stock is not None:
            obj.stock = form.new_stock
            message = ngettext(
                "%(count)+d unit: %(product)s has %(stock)d in stock now.",
                "%(count)+d units: %(product)s has %(stock)d in stock now.",
                abs(delta),
            ) % {"count": delta, "product": obj, "stock": obj.stock}
            self.message_user(request, message, messages.SUCCESS)


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    extra = 0
    readonly_fields = ["product", "quantity", "unit_price"]
    can_delete = False


@admin.register(Order)
class OrderAdmin(ReadOnly, ActionsRefusedLoudly):
    """Never deleted: a deletion would cascade without releasing the stock; cancel instead."""

    list_display = ["id", "email", "status", "total", "created_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "=reference", "email", "=idempotency_key"]
    readonly_fields = [
        "reference",
        "idempotency_key",
        "email",
        "status",
        "total",
        "created_at",
        "updated_at",
    ]
    inlines = [OrderLineInline]
    actions = ["cancel_selected"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("shop.cancel_order")

    @admin.action(description="Cancel selected unpaid orders", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        actor = request.user.get_username()
        outcomes: Counter[Cancelled] = Counter()
        unreachable: list[str] = []  # why each was refused, for the operator
        failed = 0
        for order_id, payment_id in queryset.values_list("pk", "payment__pk"):
            try:
                with operator_call():  # asks the gateway: not behind the tasks' turns
                    outcomes[order_cancel(order_id=order_id, actor=actor, message=MESSAGE)] += 1
            except TransientError as exc:
                unreachable.append(exc.explain())
                continue
            except Exception:
                logger.exception("admin: order %s could not be cancelled", order_id)
                failed += 1
                continue
            if payment_id is not None:  # the order is over: so is its charge's dead letter
                order_dead_letters_close(payment_id=payment_id, actor=actor)
        for outcome, count in outcomes.items():
            self.message_user(request, _REPORTS[outcome](count), _LEVELS[outcome])
        if unreachable:
            message = ngettext(
                "%(count)d order was not cancelled: %(why)s. It is still pending here; "
                "cancel it again (that is safe to repeat).",
                "%(count)d orders were not cancelled: %(why)s. They are still pending "
                "here; cancel them again (that is safe to repeat).",
                len(unreachable),
            ) % {"count": len(unreachable), "why": "; ".join(dict.fromkeys(unreachable))}
            self.message_user(request, message, messages.ERROR)
        if failed:
            message = ngettext(
                "%(count)d order could not be cancelled: an error was logged.",
                "%(count)d orders could not be cancelled: an error was logged.",
                failed,
            ) % {"count": failed}
            self.message_user(request, message, messages.ERROR)


@admin.register(Payment)
class PaymentAdmin(ReadOnly):
    """Evidence of what the gateway was asked and answered: read-only, never deleted."""

    list_display = ["order", "status", "amount", "gateway_charge_id", "updated_at"]
    list_filter = ["status"]
    search_fields = ["order__id", "idempotency_key", "gateway_charge_id"]
    readonly_fields = [
        "order",
        "idempotency_key",
        "amount",
        "card_token",
        "status",
        "gateway_charge_id",
        "failure_message",
        "updated_at",
    ]


@admin.register(Receipt)
class ReceiptAdmin(ReadOnly):
    """Evidence of what was emailed: read-only, never deleted."""

    list_display = ["order", "status", "attempts", "sent_at"]
    list_filter = ["status"]
    readonly_fields = [
        "order",
        "status",
        "claimed_at",
        "claimed_by",
        "sent_at",
        "attempts",
        "unconfirmed_sends",
        "message_id",
    ]


@admin.register(StockAdjustment)
class StockAdjustmentAdmin(ReadOnly):
    """Who changed which stock by how much, and when (written by product_stock_adjust)."""

    list_display = ["created_at", "product", "delta", "actor"]
    list_filter = ["actor"]
    search_fields = ["product__sku", "actor"]
