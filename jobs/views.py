from dataclasses import asdict

from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from jobs import metrics as job_metrics
from jobs.conf import jobs_settings
from jobs.health import readiness
from jobs.models import DeadLetter
from jobs.ops import snapshot


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Nothing else is checked, so a database outage
    does not make an orchestrator restart every web process."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database reachable, broker reachable, migrations applied. Public, so a
    failed check is named in fixed words; why it failed is in the server's log."""
    checks = readiness()
    ready = all(check.ok for check in checks.values())
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {name: asdict(check) for name, check in checks.items()},
    }
    return JsonResponse(body, status=200 if ready else 503)


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition. Keep it on an internal network: it is not authenticated."""
    body, content_type = job_metrics.exposition()
    return HttpResponse(body, content_type=content_type)


def operations(request: HttpRequest) -> HttpResponse:
    """The Operations page (staff only, wrapped by admin_view in the URLconf)."""
    context = {
        **admin.site.each_context(request),
        "title": "Operations",
        "snapshot": snapshot(),
        "reasons": DeadLetter.Reason.choices,
        "flower_url": jobs_settings.FLOWER_URL,
        "prometheus_url": jobs_settings.PROMETHEUS_URL,
        "refresh": 10,
    }
    return render(request, "jobs/operations.html", context)
