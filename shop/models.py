"""The shop's data. Every side effect of a job has a constraint that makes doing it twice
impossible, and every state change is a conditional update from the state it expects."""

import uuid
from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models


class Product(models.Model):
    sku = models.CharField(max_length=40, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    price = models.DecimalField(
        max_digits=10, decimal_places=2, validators=[MinValueValidator(Decimal("0.01"))]
    )
    stock = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(price__gt=0), name="product_price_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.sku})"


class StockAdjustment(models.Model):
    """An operator's change to a product's stock, in units: the audit trail of stock that
    did not move by orders, and, by its form's one-time token, the guard that a form sent
    twice (a double click, back and resubmit) adjusts once."""

    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="adjustments")
    delta = models.IntegerField()
    actor = models.CharField(max_length=150, blank=True)
    token = models.UUIDField(null=True, blank=True, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.delta:+d} {self.product.sku} by {self.actor or 'someone'}"


class Order(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Payment pending"
        PAID = "paid", "Paid"
        FAILED = "failed", "Payment failed"
        CANCELLED = "cancelled", "Cancelled"

    # What the shopper's URLs and the API use: unguessable, so nobody can look at an order
    # they did not place by counting. The integer pk stays internal (task arguments).
    reference = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The client's Idempotency-Key (API header, or the checkout form's hidden token): a
    # retried request (the response was lost, the web process died after COMMIT) finds
    # this order instead of placing and charging a second one. Unique, so two concurrent
    # retries cannot both insert.
    idempotency_key = models.CharField(
        max_length=255, unique=True, null=True, blank=True, editable=False
    )
    email = models.EmailField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        permissions = [("cancel_order", "Can cancel unpaid orders")]

    def __str__(self) -> str:
        return f"Order #{self.pk} ({self.status})"


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    quantity = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["order", "product"], name="orderline_once_per_product"),
            models.CheckConstraint(condition=models.Q(quantity__gte=1), name="orderline_qty_pos"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id} in order #{self.order_id}"

    @property
    def subtotal(self) -> Decimal:
        return self.unit_price * self.quantity


class Payment(models.Model):
    """One payment per order. The idempotency key goes with every gateway call, so a
    charge retried or run twice is the same charge in the gateway's ledger."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        # A call whose answer never came (timeout): the next attempt asks the gateway.
        UNKNOWN = "unknown", "Unknown"
        CHARGED = "charged", "Charged"
        DECLINED = "declined", "Declined"
        # Closed without a charge: an operator cancelled the order (or discarded its
        # charge's dead letter), or its payment deadline passed. The gateway was told
        # first (the key is cancelled there), so no later attempt can charge it.
        CANCELLED = "cancelled", "Cancelled"

    order = models.OneToOneField(Order, on_delete=models.CASCADE, related_name="payment")
    idempotency_key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    # The card as the processor's token ("tok_..."): the shopper's browser sends the
    # number to the gateway (POST /v1/tokens), as a processor's browser SDK does, and the
    # shop never receives or keeps a card number.
    card_token = models.CharField(max_length=64)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    gateway_charge_id = models.CharField(max_length=64, blank=True)
    failure_message = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"Payment for order #{self.order_id} ({self.status})"


class Receipt(models.Model):
    """One receipt per order (the OneToOne is the unique constraint). `sending` is a
    claim with a lease: a claim older than the lease belongs to a worker that died."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        # An operator discarded its dead letter: never sent, never resent automatically.
        ABANDONED = "abandoned", "Abandoned"

    order = models.OneToOneField(Order, on_delete=models.CASCADE, related_name="receipt")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    claimed_at = models.DateTimeField(null=True, blank=True)
    # The delivery holding the claim, "<task id>/<attempt>": every other delivery (another
    # copy of the message, a later attempt) leaves a live claim alone; its holder gives it
    # back (a failed send, receipt_release) or its lease runs out.
    claimed_by = models.CharField(max_length=255, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # claims taken, failed sends included
    # Claims that ended without knowing whether their mail went: given back for a delivery
    # that died holding it, or taken over after the lease. Above 0, the mail may have gone
    # more than once (the reconciler's receipt_resent reports it); a send that failed and
    # said so does not count.
    unconfirmed_sends = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"Receipt for order #{self.order_id} ({self.status})"

    @property
    def message_id(self) -> str:
        """Stable across resends, so a provider (or a reader) can drop a duplicate."""
        return f"<receipt-{self.order_id}@shop.example>"


class ReportRun(models.Model):
    """One requested or scheduled sales report. A report scans the whole order history, so
    at most one is queued or running at a time: the partial unique constraint makes a
    second active row impossible, whoever (a request, beat, a replay) tries to add it."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    # The Celery task id: the task finds its own run by it (and its retries, same id).
    task_id = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # When the latest attempt started: an attempt never lasts past the hard time limit.
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                models.Value(True),
                condition=models.Q(status__in=["queued", "running"]),
                name="reportrun_one_active",
            ),
        ]

    def __str__(self) -> str:
        return f"Sales report {self.task_id} ({self.status})"
