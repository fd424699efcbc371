"""A pool without time limits (threads) still ends every run of the tasks it may run:
each call is capped by the run's deadline (jobs.deadline); a worker whose pool cannot
bound the tasks of its queues refuses to start (jobs.E003)."""

import pytest

from shop.models import Payment
from tests.helpers import REPO, place_order, role_env, run_script, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def test_a_hung_gateway_call_on_the_threads_pool_ends_at_the_runs_deadline_and_is_retried(
    client, broker, gateway, start_worker, worker_env, products
):
    # given: a gateway that records each charge and answers a minute late, a client
    # timeout longer than that, and a charge message whose own soft limit is 2 s (the
    # task's is 20 s): only the message's deadline can end the call in time
    from jobs import app

    order_id = place_order(client)
    broker.purge_queues()  # the checkout's own message: replaced by the one below
    payment = Payment.objects.get(order_id=order_id)
    gateway.control(timeout_rate=1.0, timeout_seconds=60)
    env = worker_env | {"PAYMENT_GATEWAY_READ_TIMEOUT": "120"}
    payments = start_worker("payments", env=env, concurrency=4, pool="threads")
    try:
        app.send_task(
            "shop.tasks.payments.charge_payment",
            args=[payment.pk],
            soft_time_limit=2,
            time_limit=5,
        )

        # then: the call gave up at the 2 s deadline, the retry asked the gateway and
        # found the charge it had recorded: paid, long before the late answer or the
        # task's own 20 s
        wait_until(
            lambda: Payment.objects.filter(pk=payment.pk, status="charged").exists(),
            timeout=15,
            what="the payment charged after one retry",
        )
    finally:
        gateway.reset()  # the session's gateway: no later test meets its minute-late answers
    payments.stop()
    charge = "shop.tasks.payments.charge_payment"
    assert len(payments.events("retried", charge)) == 1
    assert len(gateway.ledger(payment.idempotency_key)) == 1


def test_a_threads_worker_for_a_queue_whose_tasks_do_not_bound_their_calls_refuses_to_start(
    worker_env, tmp_path
):
    env = role_env(worker_env | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    result = run_script("worker", "reports", "-P", "threads", "-n", "reports@refused", env=env)

    assert result.returncode != 0
    assert "jobs.E003" in result.stderr
    assert "shop.tasks.reports.build_sales_report" in result.stderr


@pytest.mark.parametrize(
    ("pool", "queues", "refused"),
    [
        ("threads", ["payments", "emails"], []),
        ("threads", ["reports"], ["shop.tasks.reports.build_sales_report"]),
        ("solo", ["default"], ["jobs.tasks.canary", "jobs.tasks.prune_dead_letters"]),
        ("prefork", ["reports"], []),
        ("gevent", ["reports"], []),  # enforces the hard limit
    ],
)
def test_the_pool_check_knows_which_limits_each_pool_enforces(pool, queues, refused):
    from jobs.checks import pool_check

    errors = pool_check(pool, queues)

    assert [e.id for e in errors] == (["jobs.E003"] if refused else [])
    for name in refused:
        assert name in errors[0].msg


@pytest.mark.parametrize(
    ("given", "alias"),
    [
        ("threads", "threads"),
        ("processes", "prefork"),
        ("celery.concurrency.thread:TaskPool", "threads"),
        ("myproject.pools:Pool", "myproject.pools:Pool"),
    ],
)
def test_a_pool_is_named_by_its_alias_however_the_worker_was_given_it(given, alias):
    from jobs.checks import pool_name

    assert pool_name(given) == alias


def worker_commands() -> dict[str, list[str]]:
    """Every worker command the project ships, by where it is: make run's, compose's and
    Kubernetes's."""
    import yaml

    from deploy.stack import procfile

    commands = {f"Procfile {n}": c for n, c in procfile().items() if n.startswith("worker_")}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, service in compose.items():
        if service.get("command", [""])[0] == "deploy/bin/worker":
            commands[f"compose {name}"] = service["command"]
    for document in yaml.safe_load_all((REPO / "deploy/k8s/workers.yaml").read_text()):
        if document and document["kind"] == "Deployment":
            [container] = document["spec"]["template"]["spec"]["containers"]
            commands[f"k8s {document['metadata']['name']}"] = container["command"]
    return commands


def test_every_shipped_worker_runs_a_pool_that_bounds_its_queues_tasks_and_io_runs_threads():
    from jobs.checks import pool_check

    commands = worker_commands()
    pools = {}
    for where, command in commands.items():
        words = command[command.index("deploy/bin/worker") :]
        queue = words[1]
        pool = words[words.index("-P") + 1] if "-P" in words else "prefork"
        pools[where] = (queue, pool)
        assert pool_check(pool, [queue]) == [], where

    assert len(commands) == 12  # four queues in each of the three
    assert {pool for queue, pool in pools.values() if queue in ("payments", "emails")} == {
        "threads"
    }
    assert {pool for queue, pool in pools.values() if queue in ("reports", "default")} == {
        "prefork"
    }


def test_the_shipped_smtp_configuration_holds_each_step_to_the_runs_deadline():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    [config] = [
        d
        for d in yaml.safe_load_all((REPO / "deploy/k8s/config.yaml").read_text())
        if d and d["kind"] == "ConfigMap"
    ]

    backend = "jobs.mail.DeadlineSMTPBackend"  # send_receipt says bounded_calls = True
    assert compose["x-app"]["environment"]["EMAIL_BACKEND"] == backend
    assert config["data"]["EMAIL_BACKEND"] == backend
