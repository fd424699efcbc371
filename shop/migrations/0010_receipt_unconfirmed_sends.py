from django.db import migrations, models
from django.db.models import F


def count_earlier_resends(apps, schema_editor):
    """Before this field, every claim after the first counted as a possible resend: keep
    reporting those receipts (a failed send cannot be told apart from a death any more)."""
    Receipt = apps.get_model("shop", "Receipt")
    Receipt.objects.filter(attempts__gt=1).update(unconfirmed_sends=F("attempts") - 1)


class Migration(migrations.Migration):
    dependencies = [
        ("shop", "0009_stock_adjustment"),
    ]

    operations = [
        migrations.AddField(
            model_name="receipt",
            name="unconfirmed_sends",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(count_earlier_resends, migrations.RunPython.noop),
    ]
