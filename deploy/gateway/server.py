"""A fake card processor: a standalone HTTP service with its own SQLite ledger.

It behaves like a real payment gateway (Stripe-like card tokens, idempotency keys, declines,
transient failures) and can be told to misbehave (latency, random 503s, outages, and the
nasty case of a charge that is recorded but answered too late). Its ledger is the independent
witness that no card was ever charged twice.

Standard library only: it imports nothing of the project, nor Django (an import-linter
contract says so), and its image holds Python, this package and its start script, nothing
else. That is why it stays on ``http.server`` rather than a small well-known HTTP library
(Bottle, Falcon, Starlette): each would have to be installed into that image and beside
every test run, with a server to run it, and the behaviours a fake processor exists for
(answering one connection late on its own thread, JSON even for protocol errors, refusing
an oversized or chunked body) are the very ones a framework's server would decide for us.
What is hand-written is small: one dispatch (``GatewayRequestHandler``), one body reader,
and one set of validators that every endpoint shares (``_param`` for request fields,
``_Setting`` for the fault settings of the constructor, the environment and the control).

API (JSON in, JSON out):

- ``POST /v1/tokens`` with body ``{"card": "4242424242424242"}`` (12 to 19 digits passing
  the Luhn check): 201 ``{"id": "tok_...", "object": "token", "card_last4": "4242",
  "created": "..."}``. Shoppers' browsers call it straight from the checkout page (as with
  Stripe.js), so the shop never sees a card number: its answers carry
  ``Access-Control-Allow-Origin: *`` and ``OPTIONS /v1/tokens`` answers the CORS preflight.
  No other endpoint allows cross-origin calls: they are for the shop's servers only.
  Every ledger also has the test tokens of TEST_TOKENS (``tok_visa`` charges,
  ``tok_chargeDeclined`` is declined, ``tok_flaky`` fails transiently first).
- ``POST /v1/charges`` with header ``Idempotency-Key`` and body
  ``{"amount": "12.34", "currency": "EUR", "source": "tok_visa", "description": "..."}``.
  A card number (``card``) is refused; a token the ledger does not know is a 402
  (``invalid_token``), like a decline but not stored as the key's answer.
- ``GET /v1/charges[?idempotency_key=K][&description=D]``: recorded outcomes, oldest
  first (``description`` is how a shop finds its order's charges once the key is
  forgotten, as real processors let one search charges by metadata)
- ``POST /v1/cancellations`` with header ``Idempotency-Key``: cancel the payment of that
  key before it is charged (like cancelling a Stripe PaymentIntent). Atomic with charges:
  when the key has an outcome already, nothing is cancelled and the answer carries the
  charge (``{"cancelled": false, "charge": {...}}``); otherwise every later charge with
  the key is refused (409, code ``payment_cancelled``) and the answer is
  ``{"cancelled": true}``. Cancelling twice is the same cancellation.
- ``GET /v1/control`` / ``POST /v1/control``: read / change the fault settings
- ``GET /v1/stats[?since=UNIX_SECOND]``: what the API received, accepted and refused in
  each clock second (the last hour), and in all: the witness of how hard the shop pressed
  on the gateway (``{"rate_limit": N, "seconds": [{"second": ..., "received": ...,
  "accepted": ..., "refused": ..., "charges": ...}], "totals": {...}}``; ``charges``
  counts the accepted ``POST /v1/charges``)
- ``GET /healthz``

Like real processors, the gateway can limit how fast a merchant calls it
(``rate_limit``, requests per clock second): beyond it a request is answered 429 (code
``rate_limit``) with ``Retry-After`` (seconds), before its latency and before anything
is stored. The limit counts the shop's server calls (``/v1/charges`` and
``/v1/cancellations``); tokens, which shoppers' browsers ask for, stay out of it.

Like real processors, the gateway remembers an idempotency key for a limited time
(``key_ttl_seconds``, 24 h by default; Stripe keeps keys for at least 24 hours). After
that the key is forgotten: its charge stays in the ledger, listed under
``"<key> (forgotten)"``, and a request with the key is a new request.

Ledger schema: table ``tokens`` (``id``, ``card_fingerprint``, ``card_last4``, ``behaviour``
("succeeds" | "declines" | "flaky", fixed when the card is tokenized), ``created``) and table
``charges`` (one row per idempotency key, ordered by ``seq``: ``id``, ``idempotency_key``,
``status`` ("succeeded" | "declined"), ``amount``, ``currency``, ``card_last4``,
``card_fingerprint``, ``description``, ``created``, plus the stored answer
(``response_status``, ``response_body``) replayed for repeated keys). Card numbers are
stored nowhere: a token keeps a SHA-256 fingerprint of its card and the last four digits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import socketserver
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

MAX_BODY_BYTES = 64 * 1024
# A too-large body up to this size is read and discarded so the client sees the 413.
_MAX_DRAIN_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_DESCRIPTION_LENGTH = 1000
OK_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"
FLAKY_CARD = "4000000000000119"
# Test tokens present in every ledger, named like Stripe's; each is the token of its card.
# Public test values, not secrets (hence the noqa).
TOKEN_VISA = "tok_visa"  # noqa: S105
TOKEN_DECLINED = "tok_chargeDeclined"  # noqa: S105
TOKEN_FLAKY = "tok_flaky"  # noqa: S105
TEST_TOKENS: dict[str, str] = {
    TOKEN_VISA: OK_CARD,
    TOKEN_DECLINED: DECLINED_CARD,
    TOKEN_FLAKY: FLAKY_CARD,
}

_AMOUNT_RE = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")
_CARD_RE = re.compile(r"[0-9]{12,19}")
_TOKEN_RE = re.compile(r"tok_[A-Za-z0-9_]{1,60}")
_CENT = Decimal("0.01")
_MAX_AMOUNT = Decimal("1000000000000")  # exclusive

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# --- Configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    """How one fault setting is spelled in the environment, its type and its range: the
    one declaration that the constructor, ``from_env`` and ``POST /v1/control`` check."""

    env: str
    kind: type[bool] | type[int] | type[float]
    bounds: tuple[float, float] | None = None  # inclusive
    nullable: bool = False

    def typed(self, name: str, value: object) -> object:
        """``value`` if its (JSON) type fits the setting (a whole number given for a
        float setting becomes a float); raises ValueError."""
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (self.kind is int and isinstance(value, float))
        ):
            what = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{name} must be {what}" + (" or null" if self.nullable else ""))
        return value if self.kind is int else float(value)

    def check(self, name: str, value: object) -> None:
        """Raises ValueError unless ``value`` is of the setting's type and in its range."""
        self.typed(name, value)
        if self.bounds is None or not isinstance(value, int | float):
            return
        low, high = self.bounds
        if self.kind is int and not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        if self.kind is float and not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")

    def parse(self, raw: str) -> object:
        """The value of the environment string ``raw``; raises ValueError."""
        if self.kind is bool:
            return _parse_bool(raw)
        return int(raw) if self.kind is int else float(raw)


_SETTINGS: dict[str, _Setting] = {
    "latency_ms": _Setting("GATEWAY_LATENCY_MS", int, (0, 600_000)),
    "latency_jitter_ms": _Setting("GATEWAY_LATENCY_JITTER_MS", int, (0, 600_000)),
    "failure_rate": _Setting("GATEWAY_FAILURE_RATE", float, (0.0, 1.0)),
    "reject_rate": _Setting("GATEWAY_REJECT_RATE", float, (0.0, 1.0)),
    "timeout_rate": _Setting("GATEWAY_TIMEOUT_RATE", float, (0.0, 1.0)),
    "timeout_seconds": _Setting("GATEWAY_TIMEOUT_SECONDS", float, (0.0, 3600.0)),
    "outage": _Setting("GATEWAY_OUTAGE", bool),
    "flaky_card_failures": _Setting("GATEWAY_FLAKY_CARD_FAILURES", int, (0, 1000)),
    "key_ttl_seconds": _Setting("GATEWAY_KEY_TTL", float, (0.0, 10 * 365 * 86_400.0)),
    "seed": _Setting("GATEWAY_SEED", int, nullable=True),
    "rate_limit": _Setting("GATEWAY_RATE_LIMIT", int, (1, 1_000_000), nullable=True),
}


@dataclass(frozen=True)
class GatewayConfig:
    """Fault-injection settings. Immutable: changing them builds a new config."""

    latency_ms: int = 0  # sleep before handling each POST to charges, cancellations, tokens
    latency_jitter_ms: int = 0  # plus uniform(0, this) more, as a real network varies
    failure_rate: float = 0.0  # probability that a POST /v1/charges answers 503 up front
    # probability that a POST /v1/charges is refused as invalid (400, nothing stored): the
    # permanent error of a broken integration, which only a person can fix
    reject_rate: float = 0.0
    timeout_rate: float = 0.0  # probability that a new outcome is recorded, then answered late
    timeout_seconds: float = 30.0  # how late, in that case
    outage: bool = False  # every POST to charges, cancellations and tokens answers 503
    flaky_card_failures: int = 2  # 503s per idempotency key for a flaky token before it charges
    key_ttl_seconds: float = 86_400.0  # how long an idempotency key is remembered
    seed: int | None = None  # seed of the random generator (None: unpredictable)
    # API requests per second (each clock second) above which the gateway answers 429
    # with Retry-After, as processors limit a merchant (None: no limit)
    rate_limit: int | None = None

    ENV_VARS: ClassVar[dict[str, str]] = {name: s.env for name, s in _SETTINGS.items()}

    def __post_init__(self) -> None:
        for name, setting in _SETTINGS.items():
            setting.check(name, getattr(self, name))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        """Read the GATEWAY_* variables (unset or empty means the default).

        Raises ValueError naming the variable when a value is malformed or out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, setting in _SETTINGS.items():
            raw = env.get(setting.env, "").strip()
            if not raw:
                continue
            try:
                values[name] = setting.parse(raw)
                cls(**{name: values[name]})  # range check, naming the variable on failure
            except ValueError as exc:
                raise ValueError(f"{setting.env}={raw!r}: {exc}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, object]) -> GatewayConfig:
        """A copy with ``changes`` (decoded JSON) applied; all or nothing.

        Raises ValueError on unknown keys, wrong JSON types or out-of-range values.
        """
        unknown = sorted(set(changes) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {
            name: _SETTINGS[name].typed(name, value) for name, value in changes.items()
        }
        return replace(self, **values)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")


# --- Errors and answers -------------------------------------------------------------


def error_body(kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind}
    if code is not None:
        error["code"] = code
    error["message"] = message
    return {"error": error}


class HTTPError(Exception):
    """Raised while handling a request: answered as a JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(kind, message, code)
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (the injected timeout)


@dataclass(frozen=True)
class ChargeRequest:
    """A validated POST /v1/charges."""

    idempotency_key: str
    amount: str  # canonical, two decimal places
    currency: str  # upper case
    source: str  # a well-formed token id, not necessarily a known one
    description: str | None


def card_fingerprint(card: str) -> str:
    # The ledger never stores card numbers, only enough to spot a reused key.
    return hashlib.sha256(card.encode("ascii")).hexdigest()


def card_behaviour(card: str) -> str:
    """How charges with this card's tokens behave: 'succeeds', 'declines' or 'flaky'."""
    if card == DECLINED_CARD:
        return "declines"
    if card == FLAKY_CARD:
        return "flaky"
    return "succeeds"


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def parse_token_request(body: bytes) -> str:
    """Validate a POST /v1/tokens; returns the card number or raises HTTPError(400)."""
    card = _param(_parse_json_object(body), "card", _CARD_RE, "expected 12 to 19 digits")
    if not _luhn_valid(card):
        raise HTTPError(400, "Invalid card: the number fails its check digit.")
    return card


def parse_idempotency_key(idempotency_key: str | None) -> str:
    if idempotency_key is None or not idempotency_key.strip():
        raise HTTPError(400, "Missing required header: Idempotency-Key.")
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise HTTPError(
            400, f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters."
        )
    return idempotency_key


def parse_charge_request(idempotency_key: str | None, body: bytes) -> ChargeRequest:
    """Validate a charge request; raises HTTPError(400) naming the first problem."""
    key = parse_idempotency_key(idempotency_key)
    data = _parse_json_object(body)
    if "card" in data:
        # An integration still sending card numbers: say what to do instead. The number is
        # neither stored nor echoed back.
        raise HTTPError(
            400,
            "Card numbers are not accepted here: create a token with POST /v1/tokens"
            " and send it as source.",
        )

    amount = _param(data, "amount", _AMOUNT_RE, 'expected a decimal string such as "12.34"')
    try:
        value = Decimal(amount)
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise HTTPError(400, "Invalid amount.") from None
    if value <= 0:
        raise HTTPError(400, "Invalid amount: must be greater than 0.")
    if value >= _MAX_AMOUNT:
        raise HTTPError(400, "Invalid amount: too large.")
    if value != value.quantize(_CENT):
        raise HTTPError(400, "Invalid amount: at most 2 decimal places.")

    currency = _param(data, "currency", _CURRENCY_RE, "expected a 3-letter code such as EUR")
    source = _param(data, "source", _TOKEN_RE, 'expected a token id such as "tok_visa"')

    description = data.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise HTTPError(400, "Invalid description: expected a string.")
        if len(description) > MAX_DESCRIPTION_LENGTH:
            raise HTTPError(
                400, f"Invalid description: at most {MAX_DESCRIPTION_LENGTH} characters."
            )

    return ChargeRequest(
        idempotency_key=key,
        amount=str(value.quantize(_CENT)),
        currency=currency.upper(),
        source=source,
        description=description,
    )


def _param(data: Mapping[str, object], name: str, pattern: re.Pattern[str], expected: str) -> str:
    """The required string ``data[name]`` matching ``pattern``, or HTTPError(400) saying
    it is missing or, with ``expected``, what it should look like."""
    value = data.get(name)
    if value is None:
        raise HTTPError(400, f"Missing required param: {name}.")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise HTTPError(400, f"Invalid {name}: {expected}.")
    return value


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise HTTPError(400, "Request body must be valid JSON.") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "Request body must be a JSON object.")
    return data


# --- The ledger ---------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    card_fingerprint TEXT NOT NULL,
    card_last4 TEXT NOT NULL,
    behaviour TEXT NOT NULL CHECK (behaviour IN ('succeeds', 'declines', 'flaky')),
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'declined')),
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    card_last4 TEXT NOT NULL,
    card_fingerprint TEXT NOT NULL,
    description TEXT,
    created TEXT NOT NULL,
    response_status INTEGER NOT NULL,
    response_body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cancellations (
    idempotency_key TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transient_failures (
    idempotency_key TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""

_VIEW_COLUMNS = "id, status, amount, currency, card_last4, idempotency_key, created, description"


@dataclass(frozen=True)
class Outcome:
    status: int
    body: dict[str, Any]
    replayed: bool = False  # the stored answer of an earlier request with this key
    recorded: bool = False  # this request created the ledger row


class Ledger:
    """The SQLite ledger: one row per idempotency key, written once.

    A single connection guarded by a lock: every charge is one short ``BEGIN IMMEDIATE``
    transaction (look the key up, then insert), so concurrent requests with the same key,
    in this process or another one sharing the file, can never both insert. The
    UNIQUE(idempotency_key) constraint is the backstop.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # an answered charge survives a crash
        self._conn.executescript(_SCHEMA)
        # Idempotent: a ledger opened again (or by a second process) keeps its test tokens.
        now = _now()
        self._conn.executemany(
            "INSERT INTO tokens (id, card_fingerprint, card_last4, behaviour, created)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            [
                (token, card_fingerprint(card), card[-4:], card_behaviour(card), now)
                for token, card in TEST_TOKENS.items()
            ],
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` write transaction (hold the lock): committed when the
        block ends, rolled back when it raises."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _forget_expired(self, idempotency_key: str, key_ttl: float) -> None:
        """Let go of the key's charge once it is older than the TTL (inside a transaction).

        The charge stays; its key is renamed, so the key is free for a new request.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=key_ttl)
        self._conn.execute(
            "UPDATE charges SET idempotency_key = idempotency_key || ' (forgotten ' || seq || ')'"
            " WHERE idempotency_key = ? AND created < ?",
            (idempotency_key, cutoff.isoformat(timespec="microseconds")),
        )

    def create_token(self, card: str) -> dict[str, Any]:
        """Store a new token for the card (its fingerprint and last four digits, never the
        number) and return the token as answered."""
        token = {
            "id": "tok_" + uuid.uuid4().hex[:24],
            "object": "token",
            "card_last4": card[-4:],
            "created": _now(),
        }
        with self._lock:
            self._conn.execute(
                "INSERT INTO tokens (id, card_fingerprint, card_last4, behaviour, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    token["id"],
                    card_fingerprint(card),
                    token["card_last4"],
                    card_behaviour(card),
                    token["created"],
                ),
            )
        return token

    def charge(self, request: ChargeRequest, flaky_card_failures: int, key_ttl: float) -> Outcome:
        with self._lock, self._transaction():
            self._forget_expired(request.idempotency_key, key_ttl)
            return self._charge(request, flaky_card_failures)

    def cancel(self, idempotency_key: str, key_ttl: float) -> Outcome:
        """Cancel the key's payment unless it has an outcome; one transaction with charges."""
        with self._lock, self._transaction() as conn:
            self._forget_expired(idempotency_key, key_ttl)
            row = conn.execute(
                f"SELECT {_VIEW_COLUMNS} FROM charges WHERE idempotency_key = ?",  # noqa: S608
                (idempotency_key,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO cancellations (idempotency_key, created) VALUES (?, ?)"
                    " ON CONFLICT (idempotency_key) DO NOTHING",
                    (idempotency_key, _now()),
                )
        if row is None:
            return Outcome(200, {"cancelled": True, "idempotency_key": idempotency_key})
        return Outcome(200, {"cancelled": False, "charge": dict(row)})

    def _charge(self, request: ChargeRequest, flaky_card_failures: int) -> Outcome:
        conn = self._conn
        token = conn.execute(
            "SELECT card_fingerprint, card_last4, behaviour FROM tokens WHERE id = ?",
            (request.source,),
        ).fetchone()
        row = conn.execute(
            "SELECT amount, currency, card_fingerprint, response_status, response_body"
            " FROM charges WHERE idempotency_key = ?",
            (request.idempotency_key,),
        ).fetchone()
        if row is not None:
            if (
                Decimal(row["amount"]) != Decimal(request.amount)
                or row["currency"] != request.currency
                # Two tokens of one card are the same parameters; an unknown token is not.
                or token is None
                or row["card_fingerprint"] != token["card_fingerprint"]
            ):
                return Outcome(
                    409,
                    error_body(
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same"
                        " parameters they were first used with (amount, currency, source).",
                    ),
                )
            return Outcome(row["response_status"], json.loads(row["response_body"]), replayed=True)

        cancelled = conn.execute(
            "SELECT 1 FROM cancellations WHERE idempotency_key = ?", (request.idempotency_key,)
        ).fetchone()
        if cancelled is not None:
            return Outcome(
                409,
                error_body(
                    "invalid_request_error",
                    "This payment was cancelled; it can no longer be charged.",
                    code="payment_cancelled",
                ),
            )

        if token is None:
            # Final for this card, like a decline, but nothing was charged: not stored as the
            # key's answer, so the key can still pay with a card the gateway knows.
            return Outcome(
                402,
                error_body(
                    "card_error",
                    "This card token is unknown; enter the card again.",
                    code="invalid_token",
                ),
            )

        if token["behaviour"] == "flaky":
            failures = conn.execute(
                "SELECT count FROM transient_failures WHERE idempotency_key = ?",
                (request.idempotency_key,),
            ).fetchone()
            if (failures[0] if failures else 0) < flaky_card_failures:
                conn.execute(
                    "INSERT INTO transient_failures (idempotency_key, count) VALUES (?, 1)"
                    " ON CONFLICT (idempotency_key) DO UPDATE SET count = count + 1",
                    (request.idempotency_key,),
                )
                # A transient answer is not the key's answer: a retry may succeed.
                return Outcome(
                    503,
                    error_body(
                        "api_error",
                        "A transient processing error occurred; retry with the same key.",
                        code="processing_error",
                    ),
                )

        declined = token["behaviour"] == "declines"
        charge = {
            "id": "ch_" + uuid.uuid4().hex[:24],
            "status": "declined" if declined else "succeeded",
            "amount": request.amount,
            "currency": request.currency,
            "card_last4": token["card_last4"],
            "idempotency_key": request.idempotency_key,
            "created": _now(),
            "description": request.description,
        }
        if declined:
            status = 402
            body = error_body("card_error", "Your card was declined.", code="card_declined")
            body["error"]["charge"] = charge["id"]
        else:
            status, body = 201, charge
        conn.execute(
            "INSERT INTO charges (id, idempotency_key, status, amount, currency, card_last4,"
            " card_fingerprint, description, created, response_status, response_body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge["id"],
                request.idempotency_key,
                charge["status"],
                request.amount,
                request.currency,
                token["card_last4"],
                token["card_fingerprint"],
                request.description,
                charge["created"],
                status,
                json.dumps(body),
            ),
        )
        return Outcome(status, body, recorded=True)

    def list_charges(
        self,
        idempotency_key: str | None = None,
        description: str | None = None,
        key_ttl: float | None = None,
    ) -> list[dict[str, Any]]:
        query = f"SELECT {_VIEW_COLUMNS} FROM charges WHERE 1=1"  # noqa: S608 - constant
        params: list[str] = []
        if idempotency_key is not None:
            query += " AND idempotency_key = ?"
            params.append(idempotency_key)
        if description is not None:
            query += " AND description = ?"
            params.append(description)
        with self._lock:
            if idempotency_key is not None and key_ttl is not None:
                with self._transaction():
                    self._forget_expired(idempotency_key, key_ttl)
            rows = self._conn.execute(query + " ORDER BY seq", params).fetchall()
        return [dict(row) for row in rows]


# --- The service --------------------------------------------------------------------


class Traffic:
    """Requests per clock second: received, accepted, refused (429), accepted charges.

    The rate limit is a fixed window of one clock second, the unit the stats count in,
    so "no second above the limit" reads straight off ``stats``.
    """

    KEEP_SECONDS = 3600

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._seconds: dict[int, dict[str, int]] = {}
        self._totals = dict.fromkeys(("received", "accepted", "refused", "charges"), 0)

    def arrive(self, limit: int | None, *, charge: bool) -> int | None:
        """Count one request; returns the Retry-After (whole seconds) when it is refused."""
        second = math.floor(self._clock())
        with self._lock:
            counts = self._seconds.get(second)
            if counts is None:
                counts = self._seconds[second] = dict.fromkeys(self._totals, 0)
                for old in [s for s in self._seconds if s <= second - self.KEEP_SECONDS]:
                    del self._seconds[old]
            refused = limit is not None and counts["accepted"] >= limit
            outcome = ["received", "refused" if refused else "accepted"]
            if charge and not refused:
                outcome.append("charges")
            for name in outcome:
                counts[name] += 1
                self._totals[name] += 1
        # The window reopens at the next clock second: at most 1 s away, and Retry-After
        # counts whole seconds.
        return 1 if refused else None

    def stats(self, since: int | None, limit: int | None) -> dict[str, Any]:
        with self._lock:
            seconds = [
                {"second": second, **counts}
                for second, counts in sorted(self._seconds.items())
                if since is None or second >= since
            ]
            return {"rate_limit": limit, "seconds": seconds, "totals": dict(self._totals)}


def _since(query: str) -> int | None:
    raw = parse_qs(query, keep_blank_values=True).get("since")
    if not raw:
        return None
    try:
        return int(raw[0])
    except ValueError:
        raise HTTPError(400, "since must be a whole number of seconds (Unix time).") from None


class Gateway:
    """Shared state of one running gateway: ledger, settings, random generator."""

    def __init__(self, ledger: Ledger, config: GatewayConfig) -> None:
        self.ledger = ledger
        self._config = config
        self._lock = threading.Lock()
        self._random = random.Random(config.seed)  # fault injection, not crypto
        # The jitter draws from a generator of its own: a seeded run's charge faults stay
        # the same whatever the latency.
        self._jitter = random.Random(config.seed)
        self.traffic = Traffic()
        self.stopping = threading.Event()

    @property
    def config(self) -> GatewayConfig:
        return self._config

    def update_config(self, changes: Mapping[str, object]) -> GatewayConfig:
        with self._lock:
            config = self._config.updated(changes)
            if "seed" in changes:
                self._random.seed(config.seed)
            self._config = config
            return config

    def chance(self, rate: float) -> bool:
        if rate <= 0:
            return False
        if rate >= 1:
            return True
        with self._lock:
            return self._random.random() < rate

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the gateway stops."""
        if seconds > 0:
            self.stopping.wait(seconds)

    def close(self) -> None:
        self.stopping.set()
        self.ledger.close()

    def admit(self, *, charge: bool) -> None:
        """Count an API request as it arrives; raises the 429 beyond the rate limit."""
        retry_after = self.traffic.arrive(self.config.rate_limit, charge=charge)
        if retry_after is not None:
            raise HTTPError(
                429,
                "Too many requests: the rate limit of this account is exceeded.",
                code="rate_limit",
                headers={"Retry-After": str(retry_after)},
            )

    def _arrive(self) -> GatewayConfig:
        """The latency and the outage, which every POST to the API suffers alike; returns
        the settings in force once the latency is over."""
        config = self.config
        jitter = 0.0
        if config.latency_jitter_ms:
            with self._lock:
                jitter = self._jitter.uniform(0, config.latency_jitter_ms)
        self.sleep((config.latency_ms + jitter) / 1000)
        config = self.config  # settings may have changed while we slept
        if config.outage:
            raise HTTPError(
                503, "The payment gateway is unavailable (outage).", "api_error", "outage"
            )
        return config

    def create_token(self, body: bytes) -> Response:
        # Latency and outage only, as for cancellations: the random faults are defined for
        # charges, and drawing them here too would shift a seeded run's charge faults.
        self._arrive()
        return Response(201, self.ledger.create_token(parse_token_request(body)))

    def create_charge(self, idempotency_key: str | None, body: bytes) -> Response:
        config = self._arrive()
        if self.chance(config.failure_rate):
            raise HTTPError(
                503,
                "The payment gateway is temporarily unavailable.",
                "api_error",
                "service_unavailable",
            )
        if self.chance(config.reject_rate):
            raise HTTPError(
                400,
                "Invalid request: this integration's parameters are rejected (injected fault).",
                code="parameter_invalid",
            )
        request = parse_charge_request(idempotency_key, body)
        outcome = self.ledger.charge(request, config.flaky_card_failures, config.key_ttl_seconds)
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
        delay = 0.0
        if outcome.recorded and self.chance(config.timeout_rate):
            delay = config.timeout_seconds  # recorded, but the client will not hear in time
        return Response(outcome.status, outcome.body, headers, delay)

    def cancel_payment(self, idempotency_key: str | None) -> Response:
        config = self._arrive()
        key = parse_idempotency_key(idempotency_key)
        outcome = self.ledger.cancel(key, config.key_ttl_seconds)
        return Response(outcome.status, outcome.body)


_ROUTES: dict[str, tuple[str, ...]] = {
    "/healthz": ("GET",),
    "/v1/tokens": ("POST", "OPTIONS"),
    "/v1/charges": ("GET", "POST"),
    "/v1/cancellations": ("POST",),
    "/v1/control": ("GET", "POST"),
    "/v1/stats": ("GET",),
}
# The shop's server calls: limited by rate_limit and counted by /v1/stats.
_LIMITED_PATHS = frozenset({"/v1/charges", "/v1/cancellations"})
# Browsers call POST /v1/tokens from the shop's pages, another origin: a JSON body makes
# them ask first (the preflight), and they let the page read only answers that allow it.
_CORS_PATHS = frozenset({"/v1/tokens"})
_CORS_ORIGIN = {"Access-Control-Allow-Origin": "*"}
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "600",
}


class GatewayRequestHandler(BaseHTTPRequestHandler):
    server: GatewayHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "FakeGateway/1.0"
    timeout = 120  # seconds of silence before an idle keep-alive connection is dropped
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls

    def version_string(self) -> str:
        return self.server_version

    def _handle(self) -> None:
        """Every method goes through here (see the aliases below): routing says which are
        allowed where, and answers the others 405 (or 404) as JSON."""
        try:
            response = self._dispatch(self._read_body())
        except HTTPError as exc:
            response = Response(exc.status, exc.body, exc.headers)
        except Exception:
            self.log_error("unexpected error:\n%s", traceback.format_exc().rstrip())
            response = Response(
                500, error_body("api_error", "Internal gateway error.", code="internal_error")
            )
        if urlsplit(self.path).path in _CORS_PATHS:  # errors too: the page shows their message
            response = replace(response, headers=response.headers | _CORS_ORIGIN)
        self.server.gateway.sleep(response.delay)
        self._send(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "Chunked bodies are not supported: send Content-Length.")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "Invalid Content-Length header.") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= _MAX_DRAIN_BYTES:
                self.rfile.read(length)
            raise HTTPError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).")
        return self.rfile.read(length)

    def _dispatch(self, body: bytes) -> Response:
        url = urlsplit(self.path)
        allowed = _ROUTES.get(url.path)
        if allowed is None:
            raise HTTPError(404, f"Unrecognized request URL ({self.command} {url.path}).")
        method = "GET" if self.command == "HEAD" else self.command
        if method not in allowed:
            raise HTTPError(
                405,
                f"Method {self.command} not allowed on {url.path}.",
                headers={"Allow": ", ".join(allowed)},
            )
        gateway = self.server.gateway
        if url.path == "/healthz":
            return Response(200, {"status": "ok"})
        if url.path == "/v1/control":
            if method == "POST":
                try:
                    return Response(200, gateway.update_config(_parse_json_object(body)).to_dict())
                except ValueError as exc:
                    raise HTTPError(400, f"Invalid settings: {exc}.") from None
            return Response(200, gateway.config.to_dict())
        if url.path == "/v1/stats":
            return Response(
                200, gateway.traffic.stats(_since(url.query), gateway.config.rate_limit)
            )
        if url.path in _LIMITED_PATHS:
            gateway.admit(charge=method == "POST" and url.path == "/v1/charges")
        if url.path == "/v1/cancellations":
            return gateway.cancel_payment(self.headers.get("Idempotency-Key"))
        if url.path == "/v1/tokens":
            if method == "OPTIONS":
                return Response(204, {}, dict(_CORS_PREFLIGHT))
            return gateway.create_token(body)
        if method == "POST":
            return gateway.create_charge(self.headers.get("Idempotency-Key"), body)
        query = parse_qs(url.query, keep_blank_values=True)
        keys, descriptions = query.get("idempotency_key"), query.get("description")
        charges = gateway.ledger.list_charges(
            keys[0] if keys else None,
            descriptions[0] if descriptions else None,
            key_ttl=gateway.config.key_ttl_seconds,
        )
        return Response(200, {"charges": charges})

    def _send(self, response: Response) -> None:
        no_content = response.status == 204  # no body, so neither its type nor its length
        payload = b"" if no_content else json.dumps(response.body).encode()
        try:
            self.send_response(response.status)
            if not no_content:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if payload and getattr(self, "command", None) != "HEAD":
                self.wfile.write(payload)
        except OSError as exc:  # the client went away (e.g. it timed out first)
            self.close_connection = True
            self.log_message("could not answer: %r", exc)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, unknown method...) as JSON, then close."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send(Response(code, error_body("invalid_request_error", text)))

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"gateway: {self.address_string()} {format % args}\n")


class GatewayHTTPServer(ThreadingHTTPServer):
    """One thread per connection; different idempotency keys never wait for each other."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gateway: Gateway) -> None:
        self.gateway = gateway
        super().__init__(address, GatewayRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def url(self) -> str:
        return f"http://{self.server_name}:{self.server_port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        sys.stderr.write(f"gateway: connection error from {client_address}: {exc!r}\n")


def make_server(
    host: str, port: int, db_path: str, config: GatewayConfig | None = None
) -> GatewayHTTPServer:
    """Open the ledger (creating its directory) and bind; call ``serve_forever`` to run."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(db_path)
    try:
        return GatewayHTTPServer((host, port), Gateway(ledger, config or GatewayConfig()))
    except BaseException:
        ledger.close()
        raise


def serve(
    host: str,
    port: int,
    db_path: str,
    config: GatewayConfig | None = None,
    *,
    stop: threading.Event | None = None,
) -> None:
    """Run the gateway until ``stop`` is set or, without one, until SIGTERM or SIGINT.

    Prints ``gateway listening on http://HOST:PORT`` once bound (port 0 picks a free port).
    Returns normally after a clean shutdown.
    """
    server = make_server(host, port, db_path, config)
    stop_event = stop if stop is not None else threading.Event()
    signalled: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if stop is None and threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            signalled.append(signum)  # no locks in a signal handler

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)

    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="gateway", daemon=True
    )
    thread.start()
    print(f"gateway listening on {server.url}", flush=True)
    try:
        while not signalled and not stop_event.wait(0.1):
            pass
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        server.gateway.close()
        for restored, handler in previous.items():
            signal.signal(restored, handler)
