from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from jobs import correlation


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
