"""The shop's WSGI application plus the views the benchmarks compare checkout with.
Served by gunicorn in `make bench` only (`deploy.bench.web:application`).

- `GET /bench/hello/`: a trivial Django JSON view through the same middleware: the
  ceiling of the web tier on this machine.
- `POST /bench/orders-inline/`: the same checkout, then the charge and the receipt done
  inside the request, as a shop without background jobs would do them.
- `POST /bench/orders-on-commit/`: the same checkout through the same view, its charge
  enqueued with Celery's own `delay_on_commit` (no outbox row): what a team would pick
  instead of an outbox.
- `POST /bench/orders-sql/`: the same rows in one hand-written SQL transaction
  (psycopg, no Django on this path, no publish): the database's bound.
"""

import json
import os
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django_application = get_wsgi_application()

from django.conf import settings  # noqa: E402  (configured by the line above)

from deploy.bench.sql import sql_checkout  # noqa: E402
from jobs import outbox  # noqa: E402
from shop.services import checkout  # noqa: E402
from shop.services.checkout import checkout_complete, checkout_parse  # noqa: E402
from shop.services.payments import payment_charge  # noqa: E402
from shop.services.receipts import receipt_send  # noqa: E402
from shop.views import api  # noqa: E402

settings.ROOT_URLCONF = __name__  # the shop's URLs and the ones below

# --- on commit: the same view, the charge through delay_on_commit ----------------------

_ON_COMMIT: ContextVar[bool] = ContextVar("bench_on_commit", default=False)


def _enqueue(task: Any, *, args: Iterable[Any] = (), **options: Any) -> Any:
    if _ON_COMMIT.get():
        return task.delay_on_commit(*args)  # what Celery offers: no row, publish on commit
    return outbox.enqueue(task, args=args, **options)


checkout.enqueue = _enqueue  # checkout looks it up per call


@csrf_exempt
def orders_on_commit(request: HttpRequest) -> HttpResponse:
    token = _ON_COMMIT.set(True)
    try:
        return api.orders(request)
    finally:
        _ON_COMMIT.reset(token)


# --- inline: charge and email inside the request ----------------------------------------


def hello(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"hello": "world"})


@csrf_exempt
def orders_inline(request: HttpRequest) -> HttpResponse:
    placed = checkout_complete(request=checkout_parse(json.loads(request.body)))
    order = placed.order
    payment_charge(payment_id=order.payment.pk)
    receipt_send(order_id=order.pk)
    return JsonResponse({"id": str(order.reference), "status": "paid"}, status=201)


urlpatterns = [
    path("bench/hello/", hello),
    path("bench/orders-inline/", orders_inline),
    path("bench/orders-on-commit/", orders_on_commit),
    path("", include("shop.urls")),
]

# --- sql: the same rows, one hand-written transaction, no Django -------------------------

_connection: dict[int, Any] = {}  # pid -> this process's psycopg connection


def _database() -> Any:
    import psycopg

    if os.getpid() not in _connection:  # a forked gunicorn worker opens its own
        _connection.clear()
        _connection[os.getpid()] = psycopg.connect(os.environ["DATABASE_URL"])
    return _connection[os.getpid()]


def _sql_orders(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    data = json.loads(environ["wsgi.input"].read(length))
    reference = sql_checkout(_database(), data, environ.get("HTTP_IDEMPOTENCY_KEY"))
    body = json.dumps({"id": reference, "status": "pending"}).encode()
    start_response(
        "201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    if environ.get("PATH_INFO") == "/bench/orders-sql/":
        return _sql_orders(environ, start_response)
    return django_application(environ, start_response)
