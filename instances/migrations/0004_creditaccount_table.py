"""Credit accounts move to the credits app (issue 20): first their table takes the credits
app's name, rows and ids kept. credits.0001 then takes the model up, and 0005 lets it go here."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("instances", "0003_credentialauditentry"),
    ]

    operations = [
        migrations.AlterModelTable(name="creditaccount", table="credits_creditaccount"),
    ]
