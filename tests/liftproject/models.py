from django.db import models


class Greeting(models.Model):
    """One greeting to send; `ready` False makes its strict task fail until fixed."""

    name = models.CharField(max_length=50, unique=True)
    ready = models.BooleanField(default=True)
    attempts = models.PositiveIntegerField(default=0)
    greeted_at = models.DateTimeField(null=True)

    # Declared, so the type checker (whose Django is the shop's) knows the manager.
    objects: "models.Manager[Greeting]" = models.Manager()

    def __str__(self) -> str:
        return self.name
