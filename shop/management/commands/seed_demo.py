from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand

from shop.models import Product

CATALOG = [
    ("MUG-001", "Enamel camp mug", "Holds coffee, survives a drop.", "12.50", 500),
    ("TEE-002", "Organic cotton tee", "Soft, heavy, made to last.", "24.00", 500),
    ("BAG-003", "Canvas tote bag", "Carries a week of groceries.", "18.90", 500),
    ("PEN-004", "Brass pen", "Writes first time, every time.", "34.00", 500),
    ("NBK-005", "Dot-grid notebook", "120 pages of fountain-pen-safe paper.", "9.75", 500),
    ("CAP-006", "Wool cap", "Warm without itching.", "21.00", 500),
]


class Command(BaseCommand):
    help = "Create the demo catalog (idempotent: existing products are left as they are)."

    def handle(self, *args: Any, **options: Any) -> None:
        created = 0
        for sku, name, description, price, stock in CATALOG:
            _, made = Product.objects.get_or_create(
                sku=sku,
                defaults={
                    "name": name,
                    "description": description,
                    "price": Decimal(price),
                    "stock": stock,
                },
            )
            created += made
        self.stdout.write(f"catalog: {created} product(s) created, {len(CATALOG)} in the demo")
