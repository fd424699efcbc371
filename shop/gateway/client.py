"""Client of the payment gateway: turns its answers into the project's error taxonomy.

Every call carries the payment's idempotency key and a (connect, read) timeout, capped by
what is left of the task's run (jobs.deadline), so a retried or duplicated charge is the
same charge, and a hung gateway cannot hold a worker, on any pool. Every call also waits
for its turn under the rate limit all workers share, and is not made while the circuit
breaker is open (GATEWAY, jobs.dependencies): then, and on a 429, it raises Deferred and
nothing was sent.
"""

import os
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from django.conf import settings

from jobs import deadline
from jobs.deadline import RunOutOfTime
from jobs.dependencies import Dependency
from jobs.errors import PermanentError, TransientError

# The rate limit and circuit breaker of every call (JOBS_DEPENDENCIES["gateway"]).
GATEWAY = Dependency("gateway")


class GatewayUnavailable(TransientError):
    """The gateway could not be reached, or answered 5xx: try again later."""

    def explain(self) -> str:
        return "the payment gateway did not answer"


class OutcomeUnknown(TransientError):
    """The request may have reached the gateway, but no answer came back (a read timeout,
    a connection reset after sending): the charge may or may not have happened. Ask
    before charging again."""

    def explain(self) -> str:
        return "the payment gateway's answer did not come back"


class GatewayTimeout(OutcomeUnknown):
    """No answer in time."""


class CardDeclined(PermanentError):
    """The processor refused the card (or does not know its token); retrying cannot
    change that."""


class GatewayRejected(PermanentError):
    """The gateway refused the request itself (4xx): a bug on our side, not a blip."""


class ChargeCancelled(PermanentError):
    """The payment was cancelled at the gateway (charge_cancel): it can never be charged."""


@dataclass(frozen=True)
class Charge:
    id: str
    status: str  # "succeeded" | "declined"
    message: str = ""


_clients: dict[int, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client() -> httpx.Client:
    # One pooled client per process: a prefork child must not share its parent's sockets.
    # Its timeouts come with each request (_request: capped by the run's deadline).
    # Building one loads the TLS certificates (50-100 ms): once, by one thread.
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                client = _clients[pid] = httpx.Client(base_url=settings.PAYMENT_GATEWAY_URL)
    return client


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"].get("code", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 429 asks to wait (Retry-After in seconds; 1 when absent or a date)."""
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.1), 300.0)
    except ValueError:
        return 1.0


def _request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    # Ready before the turn: the request leaves the moment its slot comes (the limit
    # is counted where the gateway receives, and slow set-up after the slot would bunch
    # calls up there).
    client = _client()
    GATEWAY.admit()  # this call's turn under the shared limit; Deferred: nothing is sent
    connect, read = settings.PAYMENT_GATEWAY_TIMEOUT
    try:
        timeout = httpx.Timeout(deadline.capped(read), connect=deadline.capped(connect))
    except RunOutOfTime:
        # The run's time is spent: nothing is sent, the task retries. Were this call the
        # breaker's probe, the next caller probes instead.
        GATEWAY.inconclusive()
        raise
    try:
        response = client.request(method, url, timeout=timeout, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # No connection, so the request was never sent.
        GATEWAY.failed()
        raise GatewayUnavailable(f"payment gateway unreachable: {exc!r}") from exc
    except httpx.TimeoutException as exc:
        GATEWAY.failed()
        raise GatewayTimeout(f"payment gateway did not answer in time: {exc!r}") from exc
    except httpx.TransportError as exc:
        # A read or write error, the connection closed mid-answer: sent, perhaps processed.
        GATEWAY.failed()
        raise OutcomeUnknown(f"payment gateway answer lost: {exc!r}") from exc
    if response.status_code == 429:
        # Refused before anything was done: a limit, not an outage (no breaker count).
        raise GATEWAY.throttled(_retry_after(response))
    if response.status_code >= 500:
        GATEWAY.failed()
        raise GatewayUnavailable(
            f"payment gateway answered {response.status_code}: {_error_message(response)}"
        )
    # The breaker watches the calls that charge and cancel: a read can succeed while
    # charging fails (a processor's partial outage), and must not close it.
    if method == "POST":
        GATEWAY.succeeded()
    else:
        GATEWAY.inconclusive()
    return response


def charge_create(
    *, idempotency_key: str, amount: Decimal, currency: str, card_token: str, description: str
) -> Charge:
    """Charge the card (the gateway's token for it) once per idempotency key. Raises
    CardDeclined (an unknown token too), ChargeCancelled, GatewayRejected, OutcomeUnknown
    or GatewayUnavailable."""
    response = _request(
        "POST",
        "/v1/charges",
        headers={"Idempotency-Key": idempotency_key},
        json={
            "amount": str(amount),
            "currency": currency,
            "source": card_token,
            "description": description,
        },
    )
    if response.status_code == 402:
        raise CardDeclined(_error_message(response))
    if response.status_code == 409 and _error_code(response) == "payment_cancelled":
        raise ChargeCancelled(_error_message(response))
    if response.status_code >= 400:
        raise GatewayRejected(f"{response.status_code}: {_error_message(response)}")
    body = response.json()
    return Charge(id=body["id"], status=body["status"])


def _first(params: dict[str, str]) -> Charge | None:
    response = _request("GET", "/v1/charges", params=params)
    if response.status_code >= 400:
        raise GatewayRejected(f"{response.status_code}: {_error_message(response)}")
    charges = response.json()["charges"]
    if not charges:
        return None
    return Charge(id=charges[0].get("id", ""), status=charges[0]["status"])


def charge_lookup(*, idempotency_key: str, description: str) -> Charge | None:
    """What the gateway did for this payment, or None when it never charged it.

    By idempotency key first; then by the charge's description (the order reference),
    because processors forget keys after about a day, and a replay or a reconciler run
    days later must still find the charge instead of making a second one.
    """
    return _first({"idempotency_key": idempotency_key}) or charge_find(description=description)


def charge_find(*, description: str) -> Charge | None:
    """The charge made for this description (the order reference), whatever its key."""
    return _first({"description": description})


def charge_cancel(*, idempotency_key: str) -> Charge | None:
    """Close the key's payment at the gateway so nothing can charge it any more.

    Asking and closing are one step at the gateway, so a charge attempt racing with the
    cancellation either happened (its Charge is returned: the payment was made) or is
    refused for good (None: cancelled). Raises GatewayUnavailable or GatewayTimeout when
    the gateway cannot say; then nothing may be assumed.
    """
    response = _request("POST", "/v1/cancellations", headers={"Idempotency-Key": idempotency_key})
    if response.status_code >= 400:
        raise GatewayRejected(f"{response.status_code}: {_error_message(response)}")
    body = response.json()
    if body["cancelled"]:
        return None
    charge = body["charge"]
    return Charge(id=charge.get("id", ""), status=charge["status"])


def charges_list() -> list[dict[str, Any]]:
    """The gateway's whole ledger (the fake gateway's; a real PSP pages through it)."""
    response = _request("GET", "/v1/charges")
    if response.status_code >= 400:
        raise GatewayRejected(f"{response.status_code}: {_error_message(response)}")
    return list(response.json()["charges"])
