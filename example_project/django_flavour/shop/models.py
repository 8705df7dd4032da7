"""The shop's one model: a customer the payment provider told us about."""

from __future__ import annotations

from django.db import models


class Customer(models.Model):
    """One row per ``customer.created`` event, written by ``shop.tasks.welcome_customer``.

    No unique constraint on ``provider_id``, on purpose (as for the Redis flavour's
    orders): here the transaction alone keeps one row per event, and the demo's row
    count shows it. A real schema would add the constraint too.
    """

    provider_id = models.CharField(max_length=100)
    email = models.EmailField()
    name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    welcome_message_id = models.CharField(max_length=100, null=True)
    welcomed_at = models.DateTimeField(null=True)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}> ({self.provider_id})"
