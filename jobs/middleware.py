from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from jobs import correlation


class ProbeMiddleware:
    """Answers /healthz, /readyz and /metrics first, before any host validation.

    Kubelet probes and Prometheus scrapes address a pod by its IP, which is not one of
    ALLOWED_HOSTS: CommonMiddleware answered them 400 (DisallowedHost) in production, so
    no pod ever became ready. These endpoints read nothing from the request, set no
    cookie and link nowhere, so any Host may ask them. Keep this middleware before any
    that reads the host (SecurityMiddleware, CommonMiddleware).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        from jobs.urls import probe_urlpatterns  # the probes' one declaration

        self.get_response = get_response
        self.probes = {f"/{p.pattern}": p.callback for p in probe_urlpatterns}

    def __call__(self, request: HttpRequest) -> HttpResponse:
        probe = self.probes.get(request.path_info)
        if probe is not None and request.method in ("GET", "HEAD"):
            return probe(request)
        return self.get_response(request)


class CorrelationIdMiddleware:
    """Give every request a correlation id and echo it in the response."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        value = correlation.from_client(request.headers.get(correlation.HTTP_HEADER))
        token = correlation.activate(value)
        try:
            response = self.get_response(request)
        finally:
            correlation.deactivate(token)
        response[correlation.HTTP_HEADER] = value
        return response
