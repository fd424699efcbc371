"""Forget the card numbers earlier versions stored in Payment.card_token.

The shop now keeps only the gateway's token. A number cannot be turned into a token
here (that is the gateway's job, and a migration must not call services), so it is
replaced by a token the gateway does not know: a payment not charged yet then ends
declined ("This card token is unknown; enter the card again."), its stock released and
the shopper told, through the ordinary decline path. A payment whose outcome is
`unknown` is still looked up by its idempotency key first, so a charge that happened
is found, never repeated.
"""

from django.db import migrations

FORGOTTEN = "tok_forgotten_card_number"


def forget_card_numbers(apps, schema_editor):
    Payment = apps.get_model("shop", "Payment")
    Payment.objects.exclude(card_token__startswith="tok_").update(card_token=FORGOTTEN)


class Migration(migrations.Migration):
    dependencies = [("shop", "0006_reportrun")]

    operations = [migrations.RunPython(forget_card_numbers, migrations.RunPython.noop)]
