"""The fake payment gateway, run as a real process (`python -m deploy.gateway`).

Every test talks HTTP to the subprocess and checks the gateway's own SQLite ledger file
directly: it is the independent witness that a card was charged exactly once, and that no
card number is kept (charges name a token from ``POST /v1/tokens``, never a card).
No Django here: run with ``pytest tests/deploy/test_gateway_server.py -p no:django``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import selectors
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.gateway import server
from deploy.gateway.server import GatewayConfig, Traffic
from tests.helpers import BIN, role_env, wait_until

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
OK_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"
FLAKY_CARD = "4000000000000119"
# The gateway's test tokens of those cards, spelled out: the shop's tests rely on the names.
OK_TOKEN = "tok_visa"
DECLINED_TOKEN = "tok_chargeDeclined"
FLAKY_TOKEN = "tok_flaky"
UNKNOWN_TOKEN = "tok_neverIssued"
CHARGE_ID = re.compile(r"ch_[0-9a-f]{24}")
TOKEN_ID = re.compile(r"tok_[0-9a-f]{24}")
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "600",
}
SEED = 1234
DEFAULTS: dict[str, Any] = {
    "latency_ms": 0,
    "latency_jitter_ms": 0,
    "failure_rate": 0.0,
    "reject_rate": 0.0,
    "timeout_rate": 0.0,
    "timeout_seconds": 30.0,
    "outage": False,
    "flaky_card_failures": 2,
    "key_ttl_seconds": 86400.0,
    "seed": SEED,
    "rate_limit": None,
}


class GatewayProcess:
    """The gateway under its start script on a free port (``--port 0``), its own ledger file."""

    def __init__(self, db_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.db_path = db_path
        self.log_path = log_path
        self.env = env or {}
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.env)
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "gateway"), "--port", "0", "--db", str(self.db_path)],
                cwd=REPO_ROOT,
                env=role_env(env),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=10)
        line = self.proc.stdout.readline() if ready else ""
        match = re.fullmatch(r"gateway listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, f"unexpected first line {line!r}; log:\n{self.log()}"
        self.url = match.group(1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).json() == {"status": "ok"}:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"gateway never healthy; log:\n{self.log()}"
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            assert self.proc.stdout is not None
            self.proc.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("gateway")
    process = GatewayProcess(tmp / "ledger.sqlite3", tmp / "gateway.log", {"GATEWAY_SEED": "1234"})
    process.start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(gateway_server: GatewayProcess) -> Iterator[httpx.Client]:
    """A client of the module's gateway, whose settings are back to DEFAULTS."""
    with httpx.Client(base_url=gateway_server.url, timeout=10) as client:
        response = client.post("/v1/control", json=DEFAULTS)
        assert response.status_code == 200
        assert response.json() == DEFAULTS
        yield client


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def charge(
    client: httpx.Client,
    key: str,
    *,
    amount: str = "12.34",
    currency: str = "EUR",
    source: str = OK_TOKEN,
    timeout: float | None = None,
) -> httpx.Response:
    body = {"amount": amount, "currency": currency, "source": source, "description": "test order"}
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    return client.post("/v1/charges", json=body, headers={"Idempotency-Key": key}, **kwargs)


def tokenize(client: httpx.Client, card: str) -> httpx.Response:
    return client.post("/v1/tokens", json={"card": card})


def token_of(client: httpx.Client, card: str) -> str:
    response = tokenize(client, card)
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def luhn_card(prefix: str = "4", length: int = 16) -> str:
    """A fresh card number with a valid check digit, seen by no other test."""
    body = prefix + "".join(random.choices("0123456789", k=length - len(prefix) - 1))
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:  # doubled: every second digit left of the check digit
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return body + str(-total % 10)


def control(client: httpx.Client, **settings: Any) -> None:
    response = client.post("/v1/control", json=settings)
    assert response.status_code == 200, response.text


def ledger_rows(process: GatewayProcess, key: str | None = None) -> list[dict[str, Any]]:
    """Rows read straight from the ledger file, not through the gateway's API."""
    with closing(sqlite3.connect(process.db_path)) as conn:
        conn.row_factory = sqlite3.Row
        if key is None:
            rows = conn.execute("SELECT * FROM charges ORDER BY seq").fetchall()
        else:
            rows = conn.execute(
                "SELECT * FROM charges WHERE idempotency_key = ?", (key,)
            ).fetchall()
    return [dict(row) for row in rows]


def token_rows(process: GatewayProcess) -> dict[str, dict[str, Any]]:
    with closing(sqlite3.connect(process.db_path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM tokens").fetchall()
    return {row["id"]: dict(row) for row in rows}


def api_rows(client: httpx.Client, key: str) -> list[dict[str, Any]]:
    response = client.get("/v1/charges", params={"idempotency_key": key})
    assert response.status_code == 200
    charges: list[dict[str, Any]] = response.json()["charges"]
    return charges


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- Tokens -------------------------------------------------------------------------


def test_tokenizing_returns_a_token_and_the_card_is_stored_nowhere(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    card = luhn_card("5")
    key = new_key()

    response = tokenize(client, card)
    charged = charge(client, key, source=response.json()["id"])
    refused = client.post(  # the old way, with the number itself: refused, and not kept
        "/v1/charges",
        json={"amount": "1.00", "currency": "EUR", "card": card},
        headers={"Idempotency-Key": new_key()},
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "object", "card_last4", "created"}
    assert TOKEN_ID.fullmatch(body["id"])
    assert (body["object"], body["card_last4"]) == ("token", card[-4:])
    assert datetime.fromisoformat(body["created"]).utcoffset() == timedelta(0)
    assert charged.status_code == 201
    assert charged.json()["card_last4"] == card[-4:]
    assert refused.status_code == 400
    assert card not in refused.text
    stored = token_rows(gateway_server)[body["id"]]
    assert stored == {
        "id": body["id"],
        "card_fingerprint": hashlib.sha256(card.encode()).hexdigest(),
        "card_last4": card[-4:],
        "behaviour": "succeeds",
        "created": body["created"],
    }
    # Every value of every table, then the raw bytes of the file and its write-ahead log.
    with closing(sqlite3.connect(gateway_server.db_path)) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"tokens", "charges"} <= set(tables)
        for table in tables:
            for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 - names from sqlite
                assert all(card not in str(value) for value in row), (table, row)
    for path in gateway_server.db_path.parent.glob(gateway_server.db_path.name + "*"):
        assert card.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{not json", "Request body must be valid JSON.", id="bad-json"),
        pytest.param("", "Request body must be valid JSON.", id="empty-body"),
        pytest.param("[1, 2]", "Request body must be a JSON object.", id="not-an-object"),
        pytest.param("{}", "Missing required param: card.", id="no-card"),
        pytest.param('{"card": null}', "Missing required param: card.", id="card-null"),
        pytest.param('{"card": "42424242424"}', "expected 12 to 19 digits", id="card-11"),
        pytest.param('{"card": "' + "4" * 20 + '"}', "expected 12 to 19 digits", id="card-20"),
        pytest.param('{"card": "4242x24242424242"}', "expected 12 to 19 digits", id="card-x"),
        pytest.param('{"card": 4242424242424242}', "expected 12 to 19 digits", id="card-int"),
        pytest.param('{"card": ""}', "expected 12 to 19 digits", id="card-empty"),
        pytest.param(
            '{"card": "4242 4242 4242 4242"}', "expected 12 to 19 digits", id="card-spaces"
        ),
        pytest.param(
            '{"card": "4242-4242-4242-4242"}', "expected 12 to 19 digits", id="card-dashes"
        ),
        pytest.param('{"card": "\u0664242424242424242"}', "12 to 19 digits", id="card-arabic"),
        pytest.param('{"card": "4242424242424241"}', "fails its check digit", id="card-luhn"),
        pytest.param('{"card": "4000000000000003"}', "fails its check digit", id="card-luhn-2"),
    ],
)
def test_invalid_token_requests_are_400_and_store_nothing(
    gateway_server: GatewayProcess, client: httpx.Client, content: str, message: str
) -> None:
    before = token_rows(gateway_server)

    response = client.post(
        "/v1/tokens", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert token_rows(gateway_server) == before


def test_tokens_allow_browsers_of_any_origin_and_nothing_else_does(client: httpx.Client) -> None:
    preflight = client.options(
        "/v1/tokens",
        headers={
            "Origin": "http://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    created = tokenize(client, OK_CARD)
    invalid = tokenize(client, "1234")
    wrong_method = client.get("/v1/tokens")
    too_large = client.post("/v1/tokens", content=b"x" * (64 * 1024 + 1))

    assert preflight.status_code == 204
    assert preflight.content == b""
    assert {k: preflight.headers.get(k) for k in PREFLIGHT_HEADERS} == PREFLIGHT_HEADERS
    for response, status in [(created, 201), (invalid, 400), (wrong_method, 405), (too_large, 413)]:
        assert response.status_code == status
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert wrong_method.headers["Allow"] == "POST, OPTIONS"
    # The rest of the API is for the shop's servers: no browser may call it.
    others = [
        charge(client, new_key()),
        client.get("/v1/charges"),
        client.options("/v1/charges", headers={"Origin": "http://shop.example"}),
        cancel(client, new_key()),
        client.get("/v1/control"),
        client.get("/healthz"),
    ]
    assert [r.status_code for r in others] == [201, 200, 405, 200, 200, 200]
    for response in others:
        assert not any(h.lower().startswith("access-control-") for h in response.headers)


def test_a_fresh_ledger_has_the_test_tokens_and_keeps_them_once(tmp_path: Path) -> None:
    process = GatewayProcess(tmp_path / "ledger.sqlite3", tmp_path / "gateway.log")
    process.start()
    assert process.stop() == 0, process.log()
    first = token_rows(process)
    process.start()  # opening the ledger again inserts nothing new
    try:
        with httpx.Client(base_url=process.url, timeout=10) as fresh:
            statuses = [
                charge(fresh, new_key(), source=token).status_code
                for token in (OK_TOKEN, DECLINED_TOKEN, FLAKY_TOKEN)
            ]
    finally:
        assert process.stop() == 0, process.log()

    expected = {
        OK_TOKEN: (OK_CARD, "succeeds"),
        DECLINED_TOKEN: (DECLINED_CARD, "declines"),
        FLAKY_TOKEN: (FLAKY_CARD, "flaky"),
    }
    assert {
        token: (row["card_fingerprint"], row["card_last4"], row["behaviour"])
        for token, row in first.items()
    } == {
        token: (hashlib.sha256(card.encode()).hexdigest(), card[-4:], behaviour)
        for token, (card, behaviour) in expected.items()
    }
    assert token_rows(process) == first
    assert statuses == [201, 402, 503]
    # The module's names for them, which the shop's code and tests use.
    assert (server.TOKEN_VISA, server.TOKEN_DECLINED, server.TOKEN_FLAKY) == (
        OK_TOKEN,
        DECLINED_TOKEN,
        FLAKY_TOKEN,
    )
    assert {token: card for token, (card, _) in expected.items()} == server.TEST_TOKENS


# --- Charging -----------------------------------------------------------------------


def test_charge_succeeds_with_201_and_one_ledger_row(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    key = new_key()

    response = charge(client, key)

    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    body = response.json()
    assert CHARGE_ID.fullmatch(body["id"])
    assert {k: body[k] for k in ("status", "amount", "currency", "card_last4")} == {
        "status": "succeeded",
        "amount": "12.34",
        "currency": "EUR",
        "card_last4": "4242",
    }
    assert body["idempotency_key"] == key
    created = datetime.fromisoformat(body["created"])
    assert created.utcoffset() == timedelta(0)
    assert api_rows(client, key) == [body]
    (row,) = ledger_rows(gateway_server, key)
    assert (row["id"], row["status"], row["amount"]) == (body["id"], "succeeded", "12.34")
    assert OK_CARD not in row.values()  # the ledger keeps no card numbers
    assert len(ledger_rows(gateway_server)) == before + 1


def test_repeated_key_replays_the_first_answer_without_charging_again(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    key = new_key()

    first = charge(client, key)
    second = charge(client, key)
    third = charge(client, key)

    assert first.status_code == second.status_code == third.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert third.headers["Idempotent-Replayed"] == "true"
    assert second.content == third.content == first.content
    assert [row["id"] for row in ledger_rows(gateway_server, key)] == [first.json()["id"]]
    assert len(ledger_rows(gateway_server)) == before + 1


@pytest.mark.parametrize(
    "change",
    [
        {"amount": "12.35"},
        {"currency": "USD"},
        {"source": DECLINED_TOKEN},  # another card
        {"source": UNKNOWN_TOKEN},  # no card: it cannot be the first one
    ],
    ids=["amount", "currency", "source", "unknown-source"],
)
def test_same_key_with_other_parameters_is_a_409(
    gateway_server: GatewayProcess, client: httpx.Client, change: dict[str, Any]
) -> None:
    key = new_key()
    first = charge(client, key)
    assert first.status_code == 201

    response = charge(client, key, **change)

    assert response.status_code == 409
    assert response.json()["error"]["type"] == "idempotency_error"
    assert "(amount, currency, source)" in response.json()["error"]["message"]
    assert "Idempotent-Replayed" not in response.headers
    assert api_rows(client, key) == [first.json()]
    assert len(ledger_rows(gateway_server, key)) == 1


def test_declined_token_is_a_402_stored_and_replayed(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    key = new_key()

    first = charge(client, key, source=DECLINED_TOKEN)
    again = charge(client, key, source=DECLINED_TOKEN)

    assert first.status_code == 402
    error = first.json()["error"]
    assert {k: error[k] for k in ("type", "code", "message")} == {
        "type": "card_error",
        "code": "card_declined",
        "message": "Your card was declined.",
    }
    assert "Idempotent-Replayed" not in first.headers
    assert again.status_code == 402
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    (row,) = ledger_rows(gateway_server, key)
    assert (row["id"], row["status"], row["card_last4"]) == (error["charge"], "declined", "0002")
    (listed,) = api_rows(client, key)
    assert (listed["id"], listed["status"]) == (error["charge"], "declined")


@pytest.mark.parametrize(
    ("card", "behaviour", "status"),
    [(OK_CARD, "succeeds", 201), (DECLINED_CARD, "declines", 402), (FLAKY_CARD, "flaky", 503)],
    ids=["ok", "declined", "flaky"],
)
def test_a_new_token_behaves_as_its_card(
    gateway_server: GatewayProcess,
    client: httpx.Client,
    card: str,
    behaviour: str,
    status: int,
) -> None:
    token = token_of(client, card)
    key = new_key()

    response = charge(client, key, source=token)

    assert token_rows(gateway_server)[token]["behaviour"] == behaviour
    assert response.status_code == status
    rows = ledger_rows(gateway_server, key)
    if status == 402:
        assert response.json()["error"]["code"] == "card_declined"
        assert [(r["status"], r["card_last4"]) for r in rows] == [("declined", card[-4:])]
    elif status == 503:
        assert response.json()["error"]["code"] == "processing_error"
        assert rows == []
    else:
        assert [(r["status"], r["card_last4"]) for r in rows] == [("succeeded", card[-4:])]


def test_another_token_of_the_same_card_is_the_same_parameters(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    key = new_key()
    first = charge(client, key, source=OK_TOKEN)

    again = charge(client, key, source=token_of(client, OK_CARD))

    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert len(ledger_rows(gateway_server, key)) == 1


def test_an_unknown_token_is_a_402_invalid_token_and_stores_nothing(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    key = new_key()

    first = charge(client, key, source=UNKNOWN_TOKEN)
    again = charge(client, key, source=UNKNOWN_TOKEN)

    for response in (first, again):  # not the key's answer: nothing to replay
        assert response.status_code == 402
        assert response.json() == {
            "error": {
                "type": "card_error",
                "code": "invalid_token",
                "message": "This card token is unknown; enter the card again.",
            }
        }
        assert "Idempotent-Replayed" not in response.headers
    assert ledger_rows(gateway_server, key) == []
    assert api_rows(client, key) == []
    assert len(ledger_rows(gateway_server)) == before
    paid = charge(client, key)  # the key is still free for a card the gateway knows
    assert paid.status_code == 201
    assert "Idempotent-Replayed" not in paid.headers


@pytest.mark.parametrize("failures", [0, 2, 3])
def test_flaky_token_fails_n_times_per_key_then_charges_once(
    gateway_server: GatewayProcess, client: httpx.Client, failures: int
) -> None:
    control(client, flaky_card_failures=failures)
    key = new_key()

    for _ in range(failures):
        response = charge(client, key, source=FLAKY_TOKEN)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "api_error"
        assert response.json()["error"]["code"] == "processing_error"
        assert "Idempotent-Replayed" not in response.headers
        assert ledger_rows(gateway_server, key) == []  # a transient answer is not stored

    success = charge(client, key, source=FLAKY_TOKEN)
    replay = charge(client, key, source=FLAKY_TOKEN)

    assert success.status_code == 201
    assert "Idempotent-Replayed" not in success.headers
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == success.json()["id"]
    assert [row["id"] for row in ledger_rows(gateway_server, key)] == [success.json()["id"]]
    # The failure budget is per key: a fresh key fails again first.
    if failures:
        assert charge(client, new_key(), source=FLAKY_TOKEN).status_code == 503


def test_concurrent_requests_with_one_key_charge_exactly_once(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    control(client, latency_ms=200)  # all twenty are in flight at the same time
    key = new_key()
    barrier = threading.Barrier(20)
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=5)
            with httpx.Client(base_url=gateway_server.url, timeout=10) as own:
                responses.append(charge(own, key))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)

    assert errors == []
    assert [r.status_code for r in responses] == [201] * 20
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count("true") == 19
    assert replayed.count(None) == 1
    assert [row["id"] for row in ledger_rows(gateway_server, key)] == list(ids)


def test_different_keys_are_served_in_parallel(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    control(client, latency_ms=5000)
    keys = [new_key() for _ in range(10)]
    statuses: list[int] = []
    before = client.get("/v1/stats").json()["totals"]["charges"]
    # Each thread's client is built first (loading certificates takes a while), so the
    # ten requests leave together.
    clients = [httpx.Client(base_url=gateway_server.url, timeout=60) for _ in keys]
    go = threading.Barrier(len(keys))

    def worker(key: str, own: httpx.Client) -> None:
        go.wait()
        with own:
            statuses.append(charge(own, key).status_code)

    threads = [
        threading.Thread(target=worker, args=pair) for pair in zip(keys, clients, strict=True)
    ]
    for thread in threads:
        thread.start()
    # All ten reach the gateway (counted on arrival, before the latency) while none has
    # had its answer: served side by side. One at a time, the tenth would be read only
    # after nine answers.
    wait_until(
        lambda: client.get("/v1/stats").json()["totals"]["charges"] - before == 10,
        timeout=60,
        what="ten charges in flight",
    )
    answered_before_the_tenth_arrived = len(statuses)
    for thread in threads:
        thread.join(timeout=60)

    assert answered_before_the_tenth_arrived == 0
    assert statuses == [201] * 10
    assert all(len(ledger_rows(gateway_server, key)) == 1 for key in keys)


# --- Forgetting keys ----------------------------------------------------------------


def test_a_key_is_forgotten_after_its_ttl_and_its_charge_is_still_found_by_description(
    client: httpx.Client,
) -> None:
    key = new_key()
    first = charge(client, key)
    control(client, key_ttl_seconds=0.2)
    time.sleep(0.3)

    by_key = api_rows(client, key)
    again = charge(client, key)  # the same key: a new request now, a second charge
    by_description = client.get("/v1/charges", params={"description": "test order"}).json()

    assert first.status_code == again.status_code == 201
    assert by_key == []
    assert again.json()["id"] != first.json()["id"]
    [forgotten] = [c for c in by_description["charges"] if c["id"] == first.json()["id"]]
    assert forgotten["idempotency_key"].startswith(f"{key} (forgotten ")
    assert api_rows(client, key) == [again.json()]


# --- Cancelling ---------------------------------------------------------------------


def cancel(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/v1/cancellations", headers={"Idempotency-Key": key})


def test_a_cancelled_key_can_never_be_charged(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    key = new_key()

    first, again = cancel(client, key), cancel(client, key)
    refused = charge(client, key)

    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"cancelled": True, "idempotency_key": key}
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "payment_cancelled"
    assert ledger_rows(gateway_server, key) == []
    assert api_rows(client, key) == []


@pytest.mark.parametrize("source", [OK_TOKEN, DECLINED_TOKEN])
def test_cancelling_a_key_with_an_outcome_cancels_nothing_and_returns_it(
    client: httpx.Client, source: str
) -> None:
    key = new_key()
    charged = charge(client, key, source=source)

    response = cancel(client, key)
    again = charge(client, key, source=source)

    assert response.status_code == 200
    body = response.json()
    assert body["cancelled"] is False
    assert body["charge"] == api_rows(client, key)[0]
    assert again.content == charged.content  # still the key's first answer


def test_a_cancel_racing_a_charge_leaves_exactly_one_of_them(client: httpx.Client) -> None:
    # The lock makes them one after the other: either the charge or the cancellation won.
    control(client, latency_ms=200)
    for _ in range(5):
        key = new_key()
        with ThreadPoolExecutor(max_workers=2) as pool:
            charging = pool.submit(charge, client, key)
            cancelling = pool.submit(cancel, client, key)
        charged = charging.result().status_code == 201
        assert cancelling.result().json()["cancelled"] is not charged
        assert len(api_rows(client, key)) == int(charged)


def test_cancelling_needs_a_key_and_fails_during_an_outage(client: httpx.Client) -> None:
    key = new_key()
    missing = client.post("/v1/cancellations")
    control(client, outage=True)
    down = cancel(client, key)
    control(client, outage=False)

    assert missing.status_code == 400
    assert "Idempotency-Key" in missing.json()["error"]["message"]
    assert down.status_code == 503
    assert charge(client, key).status_code == 201  # the failed cancel cancelled nothing


def test_charges_are_listed_in_creation_order(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    ids = [
        charge(client, new_key()).json()["id"],
        charge(client, new_key(), source=DECLINED_TOKEN).json()["error"]["charge"],
        charge(client, new_key(), amount="1").json()["id"],
    ]

    response = client.get("/v1/charges")

    assert response.status_code == 200
    listed = response.json()["charges"]
    assert [c["id"] for c in listed][-3:] == ids
    assert [c["status"] for c in listed][-3:] == ["succeeded", "declined", "succeeded"]
    assert listed[-1]["amount"] == "1.00"
    assert [c["id"] for c in listed] == [row["id"] for row in ledger_rows(gateway_server)]
    assert api_rows(client, "no-such-key") == []


# --- Faults -------------------------------------------------------------------------


def test_outage_answers_503_and_stores_nothing(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    control(client, outage=True)
    key = new_key()

    tokens = token_rows(gateway_server)

    responses = [charge(client, key), charge(client, new_key(), source=DECLINED_TOKEN)]
    tokenizing = tokenize(client, OK_CARD)  # the browser's call is down too

    assert [r.status_code for r in responses] == [503, 503]
    assert all(r.json()["error"]["type"] == "api_error" for r in responses)
    assert tokenizing.status_code == 503
    assert tokenizing.json()["error"]["code"] == "outage"
    assert tokenizing.headers["Access-Control-Allow-Origin"] == "*"
    assert client.get("/healthz").status_code == 200  # only the API is down
    assert len(ledger_rows(gateway_server)) == before
    assert token_rows(gateway_server) == tokens
    control(client, outage=False)
    after = charge(client, key)
    assert after.status_code == 201
    assert "Idempotent-Replayed" not in after.headers
    assert len(ledger_rows(gateway_server)) == before + 1


def test_failure_rate_one_answers_503_and_stores_nothing(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    control(client, failure_rate=1.0)
    key = new_key()

    statuses = [charge(client, key).status_code for _ in range(3)]

    assert statuses == [503, 503, 503]
    assert len(ledger_rows(gateway_server)) == before
    control(client, failure_rate=0.0)
    after = charge(client, key)
    assert after.status_code == 201
    assert "Idempotent-Replayed" not in after.headers
    assert len(ledger_rows(gateway_server, key)) == 1


def test_reject_rate_one_answers_400_and_stores_nothing(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    control(client, reject_rate=1.0)

    response = charge(client, new_key())

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parameter_invalid"
    assert len(ledger_rows(gateway_server)) == before


def test_seeded_failures_are_repeatable(client: httpx.Client) -> None:
    def run(tokenizing: bool = False) -> list[int]:
        control(client, failure_rate=0.5, seed=42)
        statuses = []
        for _ in range(12):
            if tokenizing:  # draws nothing from the seeded sequence
                assert tokenize(client, OK_CARD).status_code == 201
            statuses.append(charge(client, new_key()).status_code)
        return statuses

    first, second, third = run(), run(), run(tokenizing=True)

    assert first == second == third
    assert set(first) == {201, 503}


def test_random_faults_are_for_charges_only(client: httpx.Client) -> None:
    # Tokenizing suffers the latency and the outage; the random faults model a charge's
    # failures (and its late answer), so they leave tokens alone.
    # (a token held back by the late-answer fault would outlast the client's 10 s timeout)
    control(client, failure_rate=1.0, reject_rate=1.0, timeout_rate=1.0, timeout_seconds=600.0)

    responses = [tokenize(client, OK_CARD) for _ in range(5)]

    assert [r.status_code for r in responses] == [201] * 5
    assert charge(client, new_key()).status_code == 503


def test_timeout_records_the_charge_and_a_retry_gets_it_back(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    # The first answer is held for 10 minutes: a retry it held up would outlast the
    # client's 10 s timeout.
    control(client, timeout_rate=1.0, timeout_seconds=600.0)
    key = new_key()

    with pytest.raises(httpx.ReadTimeout):
        charge(client, key, timeout=0.5)

    # The client does not know, but the charge happened.
    (recorded,) = api_rows(client, key)
    assert recorded["status"] == "succeeded"
    assert [row["id"] for row in ledger_rows(gateway_server, key)] == [recorded["id"]]

    control(client, timeout_rate=0.0)
    retry = charge(client, key)

    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == recorded["id"]
    assert len(ledger_rows(gateway_server, key)) == 1
    assert len(ledger_rows(gateway_server)) == before + 1


def test_latency_delays_charges_and_tokens(client: httpx.Client) -> None:
    control(client, latency_ms=300)

    started = time.monotonic()
    response = charge(client, new_key())
    charged = time.monotonic()
    token = tokenize(client, OK_CARD)

    assert response.status_code == 201
    assert charged - started >= 0.3
    assert token.status_code == 201
    assert time.monotonic() - charged >= 0.3


def test_jitter_adds_up_to_its_bound_to_each_latency_and_leaves_seeded_faults_alone(
    tmp_path: Path,
) -> None:
    def run(jitter_ms: int) -> tuple[list[float], list[bool]]:
        config = GatewayConfig(latency_ms=100, latency_jitter_ms=jitter_ms, seed=7)
        gateway = server.Gateway(server.Ledger(str(tmp_path / f"{jitter_ms}.sqlite3")), config)
        slept: list[float] = []
        gateway.sleep = slept.append  # type: ignore[method-assign,assignment]
        faults = []
        for _ in range(200):
            gateway._arrive()
            faults.append(gateway.chance(0.5))
        gateway.close()
        return slept, faults

    jittered, faults = run(50)
    steady, steady_faults = run(0)

    assert steady == [0.1] * 200
    assert all(0.1 <= seconds <= 0.15 for seconds in jittered)
    assert max(jittered) - min(jittered) > 0.04  # spread over the bound, not one value
    assert faults == steady_faults


# --- Bad requests -------------------------------------------------------------------

VALID = '{"amount": "12.34", "currency": "EUR", "source": "tok_visa"}'


@pytest.mark.parametrize(
    ("key", "content"),
    [
        pytest.param(None, VALID, id="missing-key"),
        pytest.param("", VALID, id="empty-key"),
        pytest.param("k" * 256, VALID, id="key-too-long"),
        pytest.param("KEY", "{not json", id="bad-json"),
        pytest.param("KEY", "", id="empty-body"),
        pytest.param("KEY", "[1, 2]", id="not-an-object"),
        pytest.param("KEY", '{"currency": "EUR", "source": "tok_visa"}', id="no-amount"),
        pytest.param("KEY", VALID.replace('"12.34"', "12.34"), id="amount-number"),
        pytest.param("KEY", VALID.replace("12.34", "0"), id="amount-zero"),
        pytest.param("KEY", VALID.replace("12.34", "-1"), id="amount-negative"),
        pytest.param("KEY", VALID.replace("12.34", "abc"), id="amount-text"),
        pytest.param("KEY", VALID.replace("12.34", "NaN"), id="amount-nan"),
        pytest.param("KEY", VALID.replace("12.34", "1e3"), id="amount-exponent"),
        pytest.param("KEY", VALID.replace("12.34", "12.345"), id="amount-sub-cent"),
        pytest.param("KEY", '{"amount": "1", "source": "tok_visa"}', id="no-currency"),
        pytest.param("KEY", VALID.replace("EUR", "EU"), id="currency-short"),
        pytest.param("KEY", VALID.replace("EUR", "EURO"), id="currency-long"),
        pytest.param("KEY", VALID.replace("EUR", "E1R"), id="currency-digit"),
        pytest.param("KEY", '{"amount": "1", "currency": "EUR"}', id="no-source"),
        pytest.param("KEY", VALID.replace('"tok_visa"', "null"), id="source-null"),
        pytest.param("KEY", VALID.replace('"tok_visa"', "42"), id="source-number"),
        pytest.param("KEY", VALID.replace('"tok_visa"', '["tok_visa"]'), id="source-list"),
        pytest.param("KEY", VALID.replace("tok_visa", ""), id="source-empty"),
        pytest.param("KEY", VALID.replace("tok_visa", "tok_"), id="source-bare-prefix"),
        pytest.param("KEY", VALID.replace("tok_visa", "card_visa"), id="source-not-a-token"),
        pytest.param("KEY", VALID.replace("tok_visa", "tok_vi-sa"), id="source-dash"),
        pytest.param("KEY", VALID.replace("tok_visa", "tok_" + "v" * 61), id="source-too-long"),
        pytest.param("KEY", VALID.replace("tok_visa", OK_CARD), id="source-a-card-number"),
        pytest.param("KEY", VALID[:-1] + ', "description": 5}', id="description-number"),
    ],
)
def test_invalid_charge_requests_are_400_and_store_nothing(
    gateway_server: GatewayProcess, client: httpx.Client, key: str | None, content: str
) -> None:
    before = len(ledger_rows(gateway_server))
    unique = f"{key}-{uuid.uuid4()}" if key == "KEY" else key
    headers = {"Content-Type": "application/json"}
    if unique is not None:
        headers["Idempotency-Key"] = unique

    response = client.post("/v1/charges", content=content, headers=headers)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"]
    assert len(ledger_rows(gateway_server)) == before
    if unique:
        assert api_rows(client, unique) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            {"card": OK_CARD},
            "Card numbers are not accepted here: create a token with POST /v1/tokens"
            " and send it as source.",
            id="card",
        ),
        pytest.param(
            {"card": OK_CARD, "source": OK_TOKEN},
            "Card numbers are not accepted here: create a token with POST /v1/tokens"
            " and send it as source.",
            id="card-and-source",
        ),
        pytest.param({}, "Missing required param: source.", id="no-source"),
    ],
)
def test_a_charge_takes_a_token_never_a_card_number(
    gateway_server: GatewayProcess, client: httpx.Client, extra: dict[str, str], message: str
) -> None:
    before = len(ledger_rows(gateway_server))
    key = new_key()

    response = client.post(
        "/v1/charges",
        json={"amount": "12.34", "currency": "EUR"} | extra,
        headers={"Idempotency-Key": key},
    )

    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": message}
    assert len(ledger_rows(gateway_server)) == before
    assert charge(client, key).headers.get("Idempotent-Replayed") is None


def test_body_over_64_kib_is_413_and_stores_nothing(
    gateway_server: GatewayProcess, client: httpx.Client
) -> None:
    before = len(ledger_rows(gateway_server))
    key = new_key()
    content = VALID[:-1] + ', "description": "' + "x" * (64 * 1024) + '"}'

    response = client.post("/v1/charges", content=content, headers={"Idempotency-Key": key})

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert len(ledger_rows(gateway_server)) == before
    assert client.get("/healthz").status_code == 200


def test_unknown_path_is_404_and_wrong_method_is_405(client: httpx.Client) -> None:
    missing = client.get("/v1/refunds")
    wrong = client.put("/v1/charges", json={})
    wrong_health = client.delete("/healthz")

    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "GET, POST"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    assert wrong_health.status_code == 405
    assert wrong_health.headers["Allow"] == "GET"


# --- Control ------------------------------------------------------------------------


def test_control_reads_and_updates_settings(client: httpx.Client) -> None:
    assert client.get("/v1/control").json() == DEFAULTS

    response = client.post("/v1/control", json={"latency_ms": 5, "outage": True})

    assert response.status_code == 200
    expected = DEFAULTS | {"latency_ms": 5, "outage": True}
    assert response.json() == expected
    assert client.get("/v1/control").json() == expected


@pytest.mark.parametrize(
    "content",
    [
        '{"failure_rate": 1.5}',
        '{"failure_rate": -0.1}',
        '{"failure_rate": "0.5"}',
        '{"timeout_rate": 2}',
        '{"timeout_seconds": -1}',
        '{"latency_ms": -1}',
        '{"latency_ms": 1.5}',
        '{"latency_ms": true}',
        '{"outage": "yes"}',
        '{"outage": 1}',
        '{"flaky_card_failures": -1}',
        '{"flaky_card_failures": "2"}',
        '{"seed": "x"}',
        '{"key_ttl_seconds": -1}',
        '{"rate_limit": 0}',
        '{"rate_limit": 2.5}',
        '{"rate_limit": "10"}',
        '{"no_such_setting": 1}',
        '{"latency_ms": 50, "failure_rate": 7}',
        "[]",
        "not json",
    ],
)
def test_control_rejects_bad_values_and_changes_nothing(client: httpx.Client, content: str) -> None:
    response = client.post("/v1/control", content=content)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/control").json() == DEFAULTS


def test_config_from_env() -> None:
    config = GatewayConfig.from_env(
        {
            "GATEWAY_LATENCY_MS": "25",
            "GATEWAY_FAILURE_RATE": "0.25",
            "GATEWAY_TIMEOUT_RATE": "0.5",
            "GATEWAY_TIMEOUT_SECONDS": "3",
            "GATEWAY_OUTAGE": "true",
            "GATEWAY_FLAKY_CARD_FAILURES": "4",
            "GATEWAY_KEY_TTL": "60",
            "GATEWAY_SEED": "9",
            "GATEWAY_RATE_LIMIT": "50",
        }
    )

    assert config == GatewayConfig(
        latency_ms=25,
        failure_rate=0.25,
        timeout_rate=0.5,
        timeout_seconds=3.0,
        outage=True,
        flaky_card_failures=4,
        key_ttl_seconds=60.0,
        seed=9,
        rate_limit=50,
    )
    assert GatewayConfig.from_env({}) == GatewayConfig()
    assert GatewayConfig.from_env({"GATEWAY_OUTAGE": "0"}).outage is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_LATENCY_MS", "fast"),
        ("GATEWAY_LATENCY_MS", "-5"),
        ("GATEWAY_FAILURE_RATE", "1.5"),
        ("GATEWAY_TIMEOUT_RATE", "nan"),
        ("GATEWAY_OUTAGE", "maybe"),
        ("GATEWAY_FLAKY_CARD_FAILURES", "1.5"),
        ("GATEWAY_SEED", "abc"),
        ("GATEWAY_KEY_TTL", "-1"),
        ("GATEWAY_RATE_LIMIT", "0"),
        ("GATEWAY_RATE_LIMIT", "2.5"),
    ],
)
def test_config_from_env_rejects_bad_values(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        GatewayConfig.from_env({name: value})


# --- Rate limit and stats ------------------------------------------------------------


def test_traffic_refuses_beyond_the_limit_in_each_clock_second() -> None:
    now = [100.2]
    traffic = Traffic(clock=lambda: now[0])

    answers = [traffic.arrive(2, charge=True) for _ in range(3)]
    now[0] = 100.9
    answers.append(traffic.arrive(2, charge=False))
    now[0] = 101.0  # a new clock second: the window reopens
    answers += [traffic.arrive(2, charge=False), traffic.arrive(None, charge=True)]

    assert answers == [None, None, 1, 1, None, None]
    stats = traffic.stats(None, 2)
    assert stats["seconds"] == [
        {"second": 100, "received": 4, "accepted": 2, "refused": 2, "charges": 2},
        {"second": 101, "received": 2, "accepted": 2, "refused": 0, "charges": 1},
    ]
    assert stats["totals"] == {"received": 6, "accepted": 4, "refused": 2, "charges": 3}
    assert traffic.stats(101, 2)["seconds"] == stats["seconds"][1:]


def test_traffic_keeps_the_last_hour() -> None:
    now = [0.0]
    traffic = Traffic(clock=lambda: now[0])
    for second in (0, 1, Traffic.KEEP_SECONDS):
        now[0] = float(second)
        traffic.arrive(None, charge=False)

    assert [row["second"] for row in traffic.stats(None, None)["seconds"]] == [1, 3600]
    assert traffic.stats(None, None)["totals"]["received"] == 3


def test_beyond_the_rate_limit_a_charge_is_429_with_retry_after_and_stores_nothing(
    client: httpx.Client, gateway_server: GatewayProcess
) -> None:
    control(client, rate_limit=2)
    # The stats count by clock second: start on a second of its own, or the calls an
    # earlier test made in this one (with no limit) count as this test's.
    since = int(time.time()) + 1
    time.sleep(since - time.time())
    keys = [new_key() for _ in range(10)]
    answers = [charge(client, key) for key in keys]

    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]  # 10 requests in far less than 5 s
    for response in refused:
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "rate_limit"
    charged = [key for key, r in zip(keys, answers, strict=True) if r.status_code == 201]
    assert len(charged) + len(refused) == len(keys)
    assert {row["idempotency_key"] for row in ledger_rows(gateway_server)} >= set(charged)
    assert not any(ledger_rows(gateway_server, key) for key in set(keys) - set(charged))

    stats = client.get("/v1/stats", params={"since": since}).json()
    assert stats["rate_limit"] == 2
    for row in stats["seconds"]:
        assert row["accepted"] <= 2, stats
        assert row["received"] == row["accepted"] + row["refused"]
    totals = sum(row["refused"] for row in stats["seconds"])
    assert totals == len(refused)
    assert sum(row["charges"] for row in stats["seconds"]) == len(charged)


def test_the_limit_counts_the_shops_calls_not_tokens_control_or_stats(
    client: httpx.Client,
) -> None:
    control(client, rate_limit=1)
    before = client.get("/v1/stats").json()["totals"]
    for _ in range(3):
        assert tokenize(client, luhn_card()).status_code == 201
        assert client.get("/v1/control").status_code == 200
        assert client.get("/healthz").status_code == 200
    after = client.get("/v1/stats").json()["totals"]
    assert after == before

    lookups = [client.get("/v1/charges", params={"idempotency_key": new_key()}) for _ in range(4)]
    cancels = [cancel(client, new_key()) for _ in range(4)]
    assert 429 in {r.status_code for r in lookups + cancels}
    counted = client.get("/v1/stats").json()["totals"]
    assert counted["received"] - after["received"] == 8
    assert counted["charges"] == after["charges"]


def test_lifting_the_limit_accepts_everything_again(client: httpx.Client) -> None:
    control(client, rate_limit=1)
    control(client, rate_limit=None)
    assert all(charge(client, new_key()).status_code == 201 for _ in range(5))


def test_stats_refuses_a_bad_since(client: httpx.Client) -> None:
    response = client.get("/v1/stats", params={"since": "yesterday"})
    assert response.status_code == 400
    assert "since" in response.json()["error"]["message"]


# --- Restart ------------------------------------------------------------------------


def test_ledger_survives_a_restart(tmp_path: Path) -> None:
    env = {"GATEWAY_FLAKY_CARD_FAILURES": "5", "GATEWAY_SEED": "7"}
    process = GatewayProcess(tmp_path / "ledger.sqlite3", tmp_path / "gateway.log", env)
    key = new_key()
    process.start()
    try:
        with httpx.Client(base_url=process.url, timeout=10) as first_client:
            settings = first_client.get("/v1/control").json()
            first = charge(first_client, key)
    finally:
        assert process.stop(signal.SIGINT) == 0, process.log()
    assert settings["flaky_card_failures"] == 5
    assert settings["seed"] == 7
    assert first.status_code == 201

    process.start()
    try:
        with httpx.Client(base_url=process.url, timeout=10) as second_client:
            listed = api_rows(second_client, key)
            again = charge(second_client, key)
    finally:
        assert process.stop(signal.SIGTERM) == 0, process.log()

    assert listed == [first.json()]
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert [row["id"] for row in ledger_rows(process, key)] == [first.json()["id"]]
