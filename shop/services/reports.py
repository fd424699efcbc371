"""The sales report: the deliberately slow bulk job that must never delay payments."""

import csv
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from shop.models import Order, OrderLine

CHUNK = 500


def sales_report_build() -> Path:
    """Write units and revenue per product over all paid orders to a CSV; return its path."""
    units: dict[str, int] = defaultdict(int)
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    names: dict[str, str] = {}
    lines = (
        OrderLine.objects.filter(order__status=Order.Status.PAID)
        .select_related("product")
        .order_by("pk")
    )
    for index, line in enumerate(lines.iterator(chunk_size=CHUNK)):
        if index % CHUNK == 0:
            time.sleep(settings.REPORT_CHUNK_DELAY)  # stands in for heavy per-chunk work
        sku = line.product.sku
        names[sku] = line.product.name
        units[sku] += line.quantity
        revenue[sku] += line.subtotal
    settings.REPORTS_DIR.mkdir(parents=True, exist_ok=True)
    path = settings.REPORTS_DIR / f"sales-{timezone.now():%Y%m%d-%H%M%S-%f}.csv"
    partial = path.with_suffix(".csv.part")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "name", "units", "revenue"])
        for sku in sorted(units):
            writer.writerow([sku, names[sku], units[sku], revenue[sku]])
    partial.rename(path)  # readers never see a half-written report
    return path
