from django.contrib import admin

from shop.models import Order, OrderLine, Payment, Product, Receipt


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
class OrderAdmin(admin.ModelAdmin):
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
