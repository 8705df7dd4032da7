"""The two URLs of the webhook, as in the Redis flavour's standard-library server."""

from __future__ import annotations

from django.urls import path

from example_project.django_flavour.shop import views

urlpatterns = [
    path("webhooks/payments", views.payment_webhook),
    path("tasks/<str:task_id>", views.task_answer),
]
