from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Background jobs"

    def ready(self) -> None:
        from jobs import checks, connections, dead_letters, lifecycle  # noqa: F401  (receivers)
