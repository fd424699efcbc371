"""/healthz says the process answers; /readyz says whether it can work right now."""

import pytest


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
    broker.stop()
    try:
        down = client.get("/readyz")
    finally:
        broker.start()
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
