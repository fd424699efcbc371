"""Hostile input: whatever arrives, the answer is a 2xx or a 4xx with a message, never a
5xx, and a rejected request writes nothing."""

import json
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.models import OutboxMessage
from shop.models import Order, Payment, Product
from tests.helpers import REPO

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ITEM = st.fixed_dictionaries(
    {},
    optional={
        "sku": st.sampled_from(["MUG", "TEE", "NOPE", ""]) | st.text(max_size=50) | JSON,
        "quantity": st.integers(-(10**12), 10**12) | JSON,
    },
)
ORDER = st.fixed_dictionaries(
    {},
    optional={
        "email": st.sampled_from(["ada@example.com", "not-an-email", ""]) | st.text() | JSON,
        "card_token": st.sampled_from(["tok_visa", "tok_", "4242424242424242"]) | JSON,
        "card": st.sampled_from(["4242424242424242"]) | JSON,
        "items": st.lists(ITEM, max_size=25) | JSON,
    },
)
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def counts() -> tuple[int, int, int, list[int]]:
    stock = list(Product.objects.order_by("sku").values_list("stock", flat=True))
    return Order.objects.count(), Payment.objects.count(), OutboxMessage.objects.count(), stock


@pytest.mark.django_db
@HYPOTHESIS
@given(body=ORDER | JSON, key=st.none() | st.sampled_from(["k1", "k2"]) | st.text(max_size=260))
def test_the_orders_api_never_fails_and_writes_only_on_a_new_201(client, products, body, key):
    before = counts()
    headers = {} if key is None else {"Idempotency-Key": key}

    response = client.post(
        "/api/orders/", json.dumps(body), content_type="application/json", headers=headers
    )

    assert response.status_code in {201, 400, 409}, response.content
    if response.status_code in {400, 409}:
        errors = response.json()["errors"]
        assert errors
        assert all(isinstance(m, str) and m for ms in errors.values() for m in ms)
        assert counts() == before
    elif response.has_header("Idempotent-Replayed"):
        assert counts() == before
    else:
        assert counts()[0] == before[0] + 1


@pytest.mark.django_db
@HYPOTHESIS
@given(raw=st.binary(max_size=300))
def test_the_orders_api_survives_arbitrary_bytes(client, products, raw):
    before = counts()

    response = client.post("/api/orders/", raw, content_type="application/json")

    assert response.status_code in {201, 400, 415}
    if response.status_code != 201:
        assert response.json()["errors"]
        assert counts() == before


@pytest.mark.django_db
@HYPOTHESIS
@given(email=st.text(max_size=300), token=st.text(max_size=80), sku=st.text(max_size=60))
def test_the_checkout_form_never_fails(client, products, email, token, sku):
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})
    client.post("/cart/update/", {"sku": sku, "quantity": "1", "mode": "add"})
    before = counts()

    response = client.post("/checkout/", {"email": email, "card_token": token})

    assert response.status_code in {302, 400}
    if response.status_code == 400:
        assert counts() == before


@pytest.mark.django_db
@HYPOTHESIS
@given(path=st.text(max_size=40))
def test_order_status_lookups_never_fail(client, path):
    response = client.get(f"/api/orders/{quote(path, safe='')}/")

    assert response.status_code in {200, 404}


@pytest.mark.django_db
def test_the_checkout_form_enforces_csrf(products):
    browser = Client(enforce_csrf_checks=True)
    browser.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})

    response = browser.post("/checkout/", {"email": "a@b.co", "card_token": "tok_visa"})

    assert response.status_code == 403
    assert Order.objects.count() == 0


def test_production_settings_pass_the_deploy_checks():
    env = {
        "PATH": "/usr/bin:/bin",
        "SHOP_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "shop.example.com",
        "FLOWER_COOKIE_SECRET": secrets.token_urlsafe(32),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_locked_dependencies_have_no_known_vulnerability():
    """pip-audit asks PyPI's vulnerability feed about every pinned package. Where the feed
    cannot be reached (these machines see only the package index) pip-audit still exits 0
    and says "No known vulnerabilities found", so the test reads the per-package skip
    reasons and skips, saying so, instead of passing on an audit that did not happen."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("pip-audit")),
            "--disable-pip",
            "--require-hashes",
            "--requirement",
            "requirements/base.txt",
            "--format",
            "json",
            "--progress-spinner",
            "off",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode not in (0, 1):
        pytest.skip(f"pip-audit could not run: {result.stderr.strip().splitlines()[-1:]}")
    report = json.loads(result.stdout)["dependencies"]
    audited = [dep for dep in report if "skip_reason" not in dep]
    if not audited:
        pytest.skip(
            "the vulnerability database is unreachable from this machine: pip-audit could "
            f"audit none of the {len(report)} locked packages ({report[0]['skip_reason']})"
        )

    vulnerable = {dep["name"]: [v["id"] for v in dep["vulns"]] for dep in audited if dep["vulns"]}
    assert len(report) > 30  # the lock file was read
    assert vulnerable == {}
