"""/healthz says the process answers; /readyz says whether it can work right now."""

import pytest
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

from jobs import health


def test_healthz_answers_without_touching_the_database(client):
    # no django_db mark: any query here would raise
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_is_200_when_database_broker_and_migrations_are_ready(client, broker):
    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {name: c["ok"] for name, c in body["checks"].items()} == {
        "database": True,
        "broker": True,
        "migrations": True,
    }
    assert body["checks"]["migrations"]["detail"] == "applied"


@pytest.mark.django_db
def test_readyz_is_503_with_the_broker_down_and_200_when_it_is_back(client, broker):
    with broker.down():
        down = client.get("/readyz")
    back = client.get("/readyz")

    assert down.status_code == 503
    assert down.json()["status"] == "unavailable"
    assert down.json()["checks"]["broker"]["ok"] is False
    assert down.json()["checks"]["database"]["ok"] is True
    assert back.status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_whatever_the_host_and_pages_still_check_it(client, broker, settings, path):
    """Kubelet and Prometheus address a pod by its IP, which is not an allowed host."""
    settings.ALLOWED_HOSTS = ["shop.example.com"]

    assert client.get(path, HTTP_HOST="10.1.2.3:8000").status_code == 200
    assert client.get("/", HTTP_HOST="10.1.2.3:8000").status_code == 400
    assert client.post(path, HTTP_HOST="10.1.2.3:8000").status_code == 400


@pytest.mark.django_db
def test_readyz_names_the_failed_broker_check_but_never_echoes_its_error(client, broker, caplog):
    with broker.down():
        down = client.get("/readyz")

    assert down.status_code == 503
    assert down.json()["checks"]["broker"] == {
        "ok": False,
        "detail": "unreachable",
        "ms": down.json()["checks"]["broker"]["ms"],
    }
    # The driver's message names the broker's address: only the server's log has it.
    assert str(broker.port) not in down.content.decode()
    assert "Error" not in down.content.decode()
    assert any(
        "broker" in r.getMessage() and str(broker.port) in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
    )


@pytest.mark.django_db
def test_readyz_names_the_failed_database_check_but_never_echoes_its_error(
    client, broker, monkeypatch, caplog
):
    secret = 'connection to "db.internal" (10.9.8.7) failed: password for user "shop"'

    def unreachable() -> None:
        raise OperationalError(secret)

    monkeypatch.setattr(connections[DEFAULT_DB_ALIAS], "cursor", unreachable)
    down = client.get("/readyz")
    monkeypatch.undo()

    assert down.status_code == 503
    checks = down.json()["checks"]
    assert {name: (c["ok"], c["detail"]) for name, c in checks.items()} == {
        "database": (False, "unreachable"),
        "broker": (True, "reachable"),
        "migrations": (False, "unknown"),
    }
    body = down.content.decode()
    assert "db.internal" not in body
    assert "OperationalError" not in body
    assert any(
        "database" in r.getMessage() and "db.internal" in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
    )


@pytest.mark.django_db
def test_readyz_says_migrations_are_not_applied_in_fixed_words(client, broker, monkeypatch):
    def pending() -> str:
        raise RuntimeError("2 migration(s) not applied")

    monkeypatch.setattr(health, "_migrations", pending)
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["migrations"]["detail"] == "not applied"
    assert "RuntimeError" not in response.content.decode()


PROBES = "jobs.middleware.ProbeMiddleware"
COMMON = "django.middleware.common.CommonMiddleware"


@pytest.mark.parametrize(
    ("middleware", "warned"),
    [
        pytest.param(None, False, id="the-shops"),
        pytest.param([COMMON], True, id="missing"),
        pytest.param([COMMON, PROBES], True, id="after-host-validation"),
        pytest.param([PROBES, COMMON], False, id="first"),
    ],
)
def test_the_start_up_check_warns_when_probes_meet_host_validation_first(
    settings, middleware, warned
):
    from jobs.checks import probe_middleware_check

    if middleware is not None:
        settings.MIDDLEWARE = middleware

    assert [m.id for m in probe_middleware_check()] == (["jobs.W002"] if warned else [])
