from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "Shop"

    def ready(self) -> None:
        # Registers the system checks, the reconciliation checks and what discarding a
        # dead letter means.
        from shop import checks, decisions, reconcile  # noqa: F401
