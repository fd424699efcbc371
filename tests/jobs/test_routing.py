"""Routing: each task lands on its own queue, declared once; a typo fails loudly."""

import pytest
from celery.exceptions import QueueNotFound
from django.conf import settings

from jobs import app, outbox
from tests.helpers import QUEUES

TASK_QUEUES = [
    ("shop.tasks.payments.charge_payment", [1], "payments"),
    ("shop.tasks.emails.send_receipt", [1], "emails"),
    ("shop.tasks.reports.build_sales_report", [], "reports"),
    ("jobs.tasks.relay_outbox", [], "default"),
    ("celery.backend_cleanup", [], "default"),
]


@pytest.mark.parametrize(("task", "args", "queue"), TASK_QUEUES)
@pytest.mark.django_db(transaction=True)
def test_each_task_lands_on_its_queue(broker, task, args, queue):
    outbox.enqueue(task, args=args)

    expected = dict.fromkeys(QUEUES, 0) | {queue: 1}
    assert broker.queue_lengths() == expected


def test_every_shop_task_has_a_route_and_no_task_sets_its_own_queue():
    app.loader.import_default_modules()
    shop_tasks = [name for name in app.tasks if name.startswith("shop.")]

    assert len(shop_tasks) == 3
    for name in shop_tasks:
        assert app.amqp.router.route({}, name)["queue"].name != "default", name
        assert getattr(app.tasks[name], "queue", None) is None, name


def test_a_task_sent_to_an_undeclared_queue_fails_loudly(broker):
    with pytest.raises(QueueNotFound, match="paymnets"):
        app.send_task("shop.tasks.payments.charge_payment", args=[1], queue="paymnets")

    assert broker.queue_lengths() == dict.fromkeys(QUEUES, 0)


def test_queues_are_declared_once_and_routes_target_declared_queues():
    declared = [queue.name for queue in settings.CELERY_TASK_QUEUES]

    assert sorted(declared) == ["default", "emails", "payments", "reports"]
    assert settings.CELERY_TASK_DEFAULT_QUEUE in declared
    assert app.conf.task_create_missing_queues is False  # jobs/conf.py
    for route in settings.CELERY_TASK_ROUTES.values():
        assert route["queue"] in declared


def test_make_run_starts_each_role_through_its_script_one_worker_per_queue_and_one_beat():
    from deploy.stack import procfile

    commands = procfile()
    scripts = {
        name: next(w for w in command if w.startswith("deploy/bin/"))
        for name, command in commands.items()
        if name != "redis"
    }  # redis: a stand-in broker, not a role
    consumed = {
        name: command[command.index("deploy/bin/worker") + 1]
        for name, command in commands.items()
        if "deploy/bin/worker" in command
    }

    assert set(scripts) == set(commands) - {"redis"}
    assert sorted(consumed.values()) == sorted(QUEUES)
    assert all(name == f"worker_{queue}" for name, queue in consumed.items())
    assert list(scripts.values()).count("deploy/bin/beat") == 1


def test_the_labs_and_benchs_stack_runs_the_pools_make_run_runs():
    from deploy import stack

    assert sorted(stack.QUEUES) == sorted(QUEUES)  # the settings' declared queues
    for queue, concurrency in stack.QUEUES.items():
        command = stack.procfile()[f"worker_{queue}"]
        assert command[command.index("deploy/bin/worker") + 1] == queue
        assert command[command.index("--concurrency") + 1] == str(concurrency)


def test_make_run_starts_every_process_of_the_procfile_but_the_stand_in_broker_and_prometheus():
    from deploy import run_local
    from deploy.stack import procfile

    started = run_local.processes()

    assert set(started) == set(procfile()) - {"redis", "prometheus"}
    assert set(run_local.processes(prometheus=True)) == set(procfile()) - {"redis"}
    assert {f"worker_{queue}" for queue in QUEUES} <= set(started)
