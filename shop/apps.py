from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "Shop"

    def ready(self) -> None:
        # Registers the reconciliation checks and what discarding a dead letter means.
        from shop import decisions, reconcile  # noqa: F401
