"""Fixtures shared by the suite: a private Redis for every test, and on request the
payment gateway, one real Celery worker per queue, or the workers a test starts itself
(`start_worker`). Helpers that are not fixtures live in tests/helpers.py."""

import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection

from shop.gateway import client as gateway_client
from shop.models import Product
from tests.helpers import QUEUES, Gateway, RedisServer, Worker, WorkerStarter

# Fixtures that start processes (workers, the gateway): a test taking one is a `stack`
# test whether or not its module says so (`make test-fast` leaves them out).
_STACK_FIXTURES = {"workers", "worker_env", "start_worker", "gateway", "gateway_process"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session", autouse=True)
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Every test talks to a private Redis; the machine's shared one is never touched."""
    from jobs import app

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    os.environ["CELERY_BROKER_URL"] = server.url
    app.conf.broker_url = server.url
    yield server
    app.pool.force_close_all()
    server.stop()


@pytest.fixture(autouse=True)
def _publishing_resumed() -> Iterator[None]:
    """A test that took the broker down leaves the outbox's breaker closed behind it, no
    row waiting to be published (its publish would land in the next test's queues), and
    no row waiting to be marked sent (its database is rolled back; at the end of the run
    the marking at exit would find the test database dropped). Only what the test
    changed is reset: `make mutate`'s map credits the lines a fixture runs to its test,
    and a reset every test ran would make every test one of the outbox's."""
    from jobs import outbox

    yield
    if outbox._outgoing._rows.unfinished_tasks:  # published during the next test otherwise
        outbox.wait_published()
    if outbox._paused_until:
        outbox.resume_publishing()
    if outbox._marks._waiting:
        outbox._marks.discard()


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The private Redis with empty queues (and every circuit breaker closed, before and
    after: a breaker a test opened must not meet a later test that takes no fixture), and
    no count of consumers cached by /metrics from another test's workers."""
    from jobs import metrics

    redis_server.purge_queues()
    redis_server.forget_dependencies()
    metrics._consumers_cache = (0.0, {})
    yield redis_server
    redis_server.forget_dependencies()
    metrics._consumers_cache = (0.0, {})


@pytest.fixture(scope="session")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("gateway"))
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway(
    gateway_process: Gateway, redis_server: RedisServer, settings: object
) -> Iterator[Gateway]:
    """The gateway with its faults off, its breaker closed, and this process's client
    pointed at it."""
    gateway_process.reset()
    redis_server.forget_dependencies()
    settings.PAYMENT_GATEWAY_URL = gateway_process.url  # type: ignore[attr-defined]
    gateway_client._clients.clear()
    yield gateway_process
    gateway_process.reset()  # also after a test that failed before putting its faults back
    redis_server.forget_dependencies()


@pytest.fixture(scope="session")
def mail_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mail")


@pytest.fixture
def mail_dir(mail_root: Path, settings: object) -> Path:
    """The file-backend mail folder, emptied for this test (pytest-django switches the
    backend to locmem; the files are the witness the workers also write to)."""
    for message in mail_root.iterdir():
        message.unlink()
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"  # type: ignore[attr-defined]
    settings.EMAIL_FILE_PATH = str(mail_root)  # type: ignore[attr-defined]
    return mail_root


def _test_database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture(scope="session")
def worker_env(
    django_db_setup: None,
    django_db_blocker: pytest.FixtureRequest,
    redis_server: RedisServer,
    gateway_process: Gateway,
    mail_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The environment of worker subprocesses: the test database, broker and gateway."""
    with django_db_blocker.unblock():  # type: ignore[attr-defined]
        database_url = _test_database_url()
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_server.url,
        "PAYMENT_GATEWAY_URL": gateway_process.url,
        "EMAIL_FILE_PATH": str(mail_root),
        "SHOP_VAR_DIR": str(tmp_path_factory.mktemp("var")),
        "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "1",
        # Short retries so exhausting them takes a second, not minutes.
        "RETRY_MAX_RETRIES": "3",
        "RETRY_BACKOFF_BASE": "0.1",
        "RETRY_BACKOFF_CAP": "0.4",
        "RETRY_OUTAGE_BUDGET": "0",  # quick retries on purpose: no start-up warning
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture
def start_worker(worker_env: dict[str, str], worker_logs: Path) -> Iterator[WorkerStarter]:
    """`start_worker(queue, env=..., concurrency=..., include=..., pool=..., ready=...,
    log_dir=...)`: a real worker for this test (on `worker_env` and `worker_logs` unless
    told), by default once it consumes its queue. Every worker it started is stopped when
    the test ends, passed or failed (tests.helpers.WorkerStarter)."""
    with WorkerStarter(worker_env, worker_logs) as start:
        yield start


@pytest.fixture(scope="module")
def workers(
    worker_env: dict[str, str], worker_logs: Path, redis_server: RedisServer
) -> Iterator[dict[str, Worker]]:
    """One real worker per queue, as `make run` starts them (module-scoped: modules
    without this fixture see queues that nobody consumes). They start on empty queues:
    what earlier modules' tests published and nobody consumed names rows their rolled
    back databases no longer hold (a charge for a missing payment is a dead letter)."""
    redis_server.purge_queues()
    with WorkerStarter(worker_env, worker_logs) as start:
        started = {queue: start(queue, ready=False) for queue in QUEUES}
        for worker in started.values():
            worker.wait_ready()
        yield started


@pytest.fixture
def products(db: None) -> dict[str, Product]:
    return {
        "MUG": Product.objects.create(sku="MUG", name="Mug", price=Decimal("12.50"), stock=10),
        "TEE": Product.objects.create(sku="TEE", name="Tee", price=Decimal("20.00"), stock=10),
    }
