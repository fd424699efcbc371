from collections import Counter
from collections.abc import Callable

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import ngettext

from jobs.admin import ActionsRefusedLoudly
from jobs.errors import TransientError
from shop.models import Order, OrderLine, Payment, Product, Receipt
from shop.services.orders import Cancelled, order_cancel

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


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "price", "stock"]
    search_fields = ["sku", "name"]


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    extra = 0
    readonly_fields = ["product", "quantity", "unit_price"]
    can_delete = False


@admin.register(Order)
class OrderAdmin(ActionsRefusedLoudly):
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
        unreachable = 0
        for order_id in queryset.values_list("pk", flat=True):
            try:
                outcomes[order_cancel(order_id=order_id, actor=actor, message=MESSAGE)] += 1
            except TransientError:
                unreachable += 1
        for outcome, count in outcomes.items():
            self.message_user(request, _REPORTS[outcome](count), _LEVELS[outcome])
        if unreachable:
            message = ngettext(
                "%(count)d order was not cancelled: the payment gateway did not answer. "
                "Nothing changed; try again.",
                "%(count)d orders were not cancelled: the payment gateway did not answer. "
                "Nothing changed; try again.",
                unreachable,
            ) % {"count": unreachable}
            self.message_user(request, message, messages.ERROR)


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = ["order", "status", "amount", "gateway_charge_id", "updated_at"]
    list_filter = ["status"]
    search_fields = ["order__id", "idempotency_key", "gateway_charge_id"]
    readonly_fields = [
        "order",
        "idempotency_key",
        "amount",
        "card_last4",
        "status",
        "gateway_charge_id",
        "failure_message",
        "updated_at",
    ]
    exclude = ["card_token"]


@admin.register(Receipt)
class ReceiptAdmin(admin.ModelAdmin):
    list_display = ["order", "status", "attempts", "sent_at"]
    list_filter = ["status"]
    readonly_fields = [
        "order",
        "status",
        "claimed_at",
        "claimed_by",
        "sent_at",
        "attempts",
        "message_id",
    ]
