import uuid

from django.db import migrations, models


def give_each_order_its_own_reference(apps, schema_editor):
    Order = apps.get_model("shop", "Order")
    for order in Order.objects.filter(reference__isnull=True).only("pk"):
        Order.objects.filter(pk=order.pk).update(reference=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_receipt_claimed_by")]

    operations = [
        # In three steps: a default on AddField would give every existing row the same UUID.
        migrations.AddField(
            model_name="order", name="reference", field=models.UUIDField(null=True)
        ),
        migrations.RunPython(give_each_order_its_own_reference, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="order",
            name="reference",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
        ),
    ]
