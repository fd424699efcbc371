"""The JSON API. Every error is JSON with a message; nothing is written on bad input."""

import json
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from shop import selectors
from shop.services.checkout import (
    CheckoutConflict,
    CheckoutError,
    checkout_complete,
    checkout_parse,
    idempotency_key_parse,
)
from shop.services.reports import ReportBusy, ReportForbidden, report_request


def _errors(status: int, errors: dict[str, Any]) -> JsonResponse:
    return JsonResponse({"errors": errors}, status=status)


def _method_not_allowed(allowed: str) -> JsonResponse:
    response = _errors(405, {"method": [f"Use {allowed}."]})
    response["Allow"] = allowed
    return response


def _csrf_checked(request: HttpRequest) -> HttpResponse:
    """Stands for a view that is not CSRF-exempt, for the check in `_csrf_refused`."""
    return HttpResponse()


def _csrf_refused(request: HttpRequest) -> bool:
    """Django's CSRF check, run here so that its refusal is JSON like every other error."""
    check = CsrfViewMiddleware(_csrf_checked)
    return check.process_view(request, _csrf_checked, (), {}) is not None


def _json_body(request: HttpRequest) -> Any:
    """The parsed body, or raise ValueError/RequestDataTooBig."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if declared.isdigit() and int(declared) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
        raise RequestDataTooBig
    return json.loads(request.body)


def products(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed("GET")
    data = [
        {"sku": p.sku, "name": p.name, "price": str(p.price), "stock": p.stock}
        for p in selectors.product_list()
    ]
    return JsonResponse(data, safe=False)


@csrf_exempt  # a JSON API for programs, not a cookie-authenticated form
def orders(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed("POST")
    if request.content_type != "application/json":
        return _errors(415, {"body": ["Send Content-Type: application/json."]})
    try:
        data = _json_body(request)
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 1024
        return _errors(413, {"body": [f"Request body too large (limit {limit} KiB)."]})
    except (ValueError, UnicodeDecodeError):
        return _errors(400, {"body": ["Malformed JSON."]})
    errors: dict[str, list[str]] = {}
    key, order_request = None, None
    try:  # both checked, so one answer lists every problem
        key = idempotency_key_parse(request.headers.get("Idempotency-Key"))
    except CheckoutError as exc:
        errors.update(exc.errors)
    try:
        order_request = checkout_parse(data)
    except CheckoutError as exc:
        errors.update(exc.errors)
    if errors or order_request is None:
        return _errors(400, errors)
    try:
        placed = checkout_complete(request=order_request, idempotency_key=key)
    except CheckoutConflict as exc:
        return _errors(409, exc.errors)
    except CheckoutError as exc:
        return _errors(400, exc.errors)
    order = placed.order
    url = selectors.order_url(order)
    body = {"id": str(order.reference), "status": order.status, "url": url}
    # A replay answers as the first request did (201, same order), and says so.
    response = JsonResponse(body, status=201)
    response["Location"] = url
    if placed.replayed:
        response["Idempotent-Replayed"] = "true"
    return response


def order_detail(request: HttpRequest, reference: UUID) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed("GET")
    order = selectors.order_get(reference=reference)
    if order is None:
        return _errors(404, {"order": [f"No order with id {reference}."]})
    return JsonResponse(selectors.order_status(order))


@csrf_exempt  # checked below, for session users only: the refusal must be JSON
def sales_report(request: HttpRequest) -> HttpResponse:
    """Queue a full-history sales report: staff only (session), one at a time."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    # A session is ambient authority: without the token, another site's form could use it.
    if request.user.is_authenticated and _csrf_refused(request):
        message = "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken."
        return _errors(403, {"csrf": [message]})
    try:
        run = report_request(actor=request.user)
    except ReportForbidden as exc:
        return _errors(403, exc.errors)
    except ReportBusy as exc:
        return _errors(409, exc.errors)
    return JsonResponse({"task_id": run.task_id}, status=202)
