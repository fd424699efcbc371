"""The shop's WSGI application plus the two views the benchmarks compare checkout with.
Served by gunicorn in `make bench` only (`deploy.bench.web:application`).

- `GET /bench/hello/`: a trivial Django JSON view through the same middleware: the
  ceiling of the web tier on this machine.
- `POST /bench/orders-inline/`: the same checkout, then the charge and the receipt done
  inside the request, as a shop without background jobs would do them.
"""

import json
import os

from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
application = get_wsgi_application()

from django.conf import settings  # noqa: E402  (configured by the line above)

from shop.services.checkout import checkout_complete, checkout_parse  # noqa: E402
from shop.services.payments import payment_charge  # noqa: E402
from shop.services.receipts import receipt_send  # noqa: E402

settings.ROOT_URLCONF = __name__  # the shop's URLs and the two below


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
    path("", include("shop.urls")),
]
