"""What a host includes (``path("", include("jobs.urls"))``, before ``admin/`` so the
Operations page is found under it): probes, metrics, and the Operations page."""

from django.contrib import admin
from django.urls import path

from jobs import views

# Answered by jobs.middleware.ProbeMiddleware before any other middleware runs: they read
# nothing of the request (no session, no user), so any Host may ask them.
probe_urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
]

urlpatterns = [
    *probe_urlpatterns,
    path("admin/operations/", admin.site.admin_view(views.operations), name="jobs-operations"),
]
