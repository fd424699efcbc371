"""Replay and discard: through the outbox, once per row however many operators click,
guarded by permissions, in batches; from the admin and from `manage.py dlq`."""

import json
import logging
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.utils import timezone

from jobs import dead_letters
from jobs.errors import TransientError
from jobs.models import DeadLetter
from jobs.testing import assert_enqueued, assert_nothing_enqueued, enqueued
from tests.helpers import run_concurrently

CHANGELIST = "/admin/jobs/deadletter/"


def make_letter(**fields: object) -> DeadLetter:
    defaults: dict[str, object] = {
        "task_id": str(uuid.uuid4()),
        "task_name": "shop.tasks.payments.charge_payment",
        "args": [42],
        "queue": "payments",
        "reason": DeadLetter.Reason.RETRIES_EXHAUSTED,
        "exception_class": "shop.gateway.client.GatewayUnavailable",
        "exception_message": "payment gateway answered 503",
        "traceback": 'Traceback (most recent call last):\n  File "x.py"\nGatewayUnavailable: 503',
        "attempts": 6,
        "correlation_id": "req-123",
    }
    return DeadLetter.objects.create(**(defaults | fields))


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    wanted = ["view_deadletter", *codenames]
    user.user_permissions.set(Permission.objects.filter(codename__in=wanted))
    return user


@pytest.mark.django_db(transaction=True)
def test_replay_publishes_through_the_outbox_with_a_link_and_an_audit_trail(broker):
    letter = make_letter()

    result = dead_letters.dead_letter_replay(ids=[letter.pk], actor="ops")

    assert (result.done, result.refused) == (1, 0)
    [message] = assert_enqueued(letter.task_name, args=[42])
    assert len(enqueued()) == 1
    assert message.headers == {"replay_of": letter.task_id, "x_correlation_id": "req-123"}
    assert str(message.task_id) != letter.task_id
    assert broker.queue_lengths()["payments"] == 1
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.REPLAYED
    assert (letter.handled_by, letter.replay_task_id) == ("ops", str(message.task_id))
    assert letter.handled_at is not None
    assert letter.replay_outcome == DeadLetter.Outcome.PENDING


@pytest.mark.django_db(transaction=True)
def test_replaying_a_row_twice_or_from_two_operators_at_once_publishes_once(broker):
    letter = make_letter()
    results: list[dead_letters.Handled] = []

    errors = run_concurrently(
        lambda: results.append(dead_letters.dead_letter_replay(ids=[letter.pk], actor="ops"))
    )
    again = dead_letters.dead_letter_replay(ids=[letter.pk], actor="ops")

    assert errors == []
    assert sorted((r.done, r.refused) for r in results) == [(0, 1), (1, 0)]
    assert (again.done, again.refused) == (0, 1)
    assert len(enqueued()) == 1
    assert broker.queue_lengths()["payments"] == 1


def replayed_as_others_see_it() -> int:
    """Replayed rows counted on a connection of its own: committed ones only."""
    counts: list[int] = []
    replayed = DeadLetter.objects.filter(status=DeadLetter.Status.REPLAYED)
    assert run_concurrently(lambda: counts.append(replayed.count()), times=1) == []
    return counts[0]


@pytest.mark.django_db(transaction=True)
def test_bulk_replay_goes_in_batches(broker, settings, monkeypatch):
    settings.JOBS_REPLAY_BATCH_SIZE = 10
    settings.JOBS_REPLAY_BATCH_PAUSE = 7.5
    letters = [make_letter(args=[n]) for n in range(25)]
    pauses: list[tuple[float, int, int]] = []  # (seconds, rows replayed, messages queued)

    def pause(seconds: float) -> None:
        queued = broker.client().llen("payments")  # as it is: queue_lengths() would wait
        pauses.append((seconds, replayed_as_others_see_it(), queued))

    monkeypatch.setattr(dead_letters, "time", SimpleNamespace(sleep=pause))

    result = dead_letters.dead_letter_replay(ids=[x.pk for x in letters], actor="ops")

    # then: three transactions, each committed (and its rows published) before the pause
    # that follows it
    assert pauses == [(7.5, 10, 10), (7.5, 20, 20)]
    assert result.done == 25
    assert broker.queue_lengths()["payments"] == 25
    assert not DeadLetter.objects.filter(status=DeadLetter.Status.DEAD).exists()


@pytest.mark.django_db(transaction=True)
def test_replaying_a_row_that_no_longer_exists_refuses_it_and_writes_nothing_for_it(broker):
    live, gone = make_letter(args=[1]), make_letter(args=[2])
    DeadLetter.objects.filter(pk=gone.pk).delete()  # pruned or discarded meanwhile

    result = dead_letters.dead_letter_replay(ids=[live.pk, gone.pk], actor="ops")

    assert (result.done, result.refused, result.errors) == (1, 1, ())
    assert [m.args for m in enqueued()] == [[1]]
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [live.pk]


@pytest.mark.django_db(transaction=True)
def test_a_row_naming_a_task_that_is_not_registered_is_refused(broker):
    tampered = make_letter(task_name="os.system", args=["rm -rf /"])

    result = dead_letters.dead_letter_replay(ids=[tampered.pk], actor="ops")

    assert (result.done, result.refused) == (0, 1)
    assert DeadLetter.objects.get().status == DeadLetter.Status.DEAD
    assert_nothing_enqueued()
    assert broker.queue_lengths() == dict.fromkeys(broker.queue_lengths(), 0)


@pytest.mark.django_db(transaction=True)
def test_a_refused_row_does_not_stop_the_rows_after_it(broker):
    tampered = make_letter(task_name="os.system", args=["rm -rf /"])
    handled = make_letter(status=DeadLetter.Status.DISCARDED)
    fine = make_letter()

    result = dead_letters.dead_letter_replay(ids=[tampered.pk, handled.pk, fine.pk], actor="ops")

    assert (result.done, result.refused) == (1, 2)
    assert DeadLetter.objects.get(pk=fine.pk).status == DeadLetter.Status.REPLAYED
    assert [m.task_name for m in enqueued()] == [fine.task_name]


@pytest.mark.django_db(transaction=True)
def test_a_row_whose_queue_is_gone_is_refused_with_a_reason_and_the_others_replay(
    broker, monkeypatch, caplog
):
    from celery.app.routes import Router, prepare

    from jobs import app

    stuck = make_letter(task_name="shop.tasks.payments.charge_payment")
    fine = make_letter(task_name="shop.tasks.emails.send_receipt", queue="emails")
    routes = {"shop.tasks.payments.*": {"queue": "retired"}, "shop.tasks.emails.*": "emails"}
    monkeypatch.setattr(
        app.amqp, "router", Router(prepare(routes), app.amqp.queues, create_missing=False, app=app)
    )

    with caplog.at_level(logging.INFO, logger="jobs.dead_letters"):
        result = dead_letters.dead_letter_replay(ids=[stuck.pk, fine.pk], actor="ops")

    assert stuck.pk < fine.pk  # replayed in id order: the row after the stuck one goes on
    assert result.done == 1
    assert "dead letters: ops replayed 1, refused 1" in caplog.messages
    assert result.errors == (
        f"Dead letter {stuck.pk} was not replayed: its task routes to a queue that is not "
        "declared.",
    )
    assert DeadLetter.objects.get(pk=stuck.pk).status == "dead"  # still waiting, untouched
    assert DeadLetter.objects.get(pk=fine.pk).status == "replayed"
    assert [m.task_name for m in enqueued()] == [fine.task_name]


@pytest.mark.django_db
def test_discard_marks_dead_rows_only():
    replayed, dead = make_letter(status=DeadLetter.Status.REPLAYED), make_letter()

    result = dead_letters.dead_letter_discard(ids=[dead.pk, replayed.pk], actor="ops")

    assert (result.done, result.refused) == (1, 1)
    dead.refresh_from_db()
    assert (dead.status, dead.handled_by) == (DeadLetter.Status.DISCARDED, "ops")
    assert DeadLetter.objects.get(pk=replayed.pk).status == DeadLetter.Status.REPLAYED


@pytest.mark.django_db
def test_a_discard_whose_consequence_fails_or_loses_the_row_leaves_the_rows_after_it(
    monkeypatch, caplog
):
    asks = make_letter(task_name="tests.discard.unsure")
    failing = make_letter(task_name="tests.discard.fails")
    raced = make_letter(task_name="tests.discard.races")
    fine = make_letter(task_name="tests.discard.plain")

    def unsure(row: DeadLetter, actor: str) -> None:
        raise TransientError("the gateway did not answer")

    def fails(row: DeadLetter, actor: str) -> None:
        raise RuntimeError("a bug in the consequence")

    def races(row: DeadLetter, actor: str) -> None:
        # another operator replays the row while its consequence runs
        DeadLetter.objects.filter(pk=row.pk).update(status=DeadLetter.Status.REPLAYED)

    handlers = {"tests.discard.unsure": unsure, "tests.discard.fails": fails}
    handlers["tests.discard.races"] = races
    monkeypatch.setattr(dead_letters, "_discard_handlers", handlers)

    with caplog.at_level(logging.INFO, logger="jobs.dead_letters"):
        result = dead_letters.dead_letter_discard(
            ids=[asks.pk, failing.pk, raced.pk, fine.pk], actor="ops"
        )

    assert (result.done, result.refused) == (1, 1)
    assert result.errors == (
        f"Dead letter {asks.pk} was not discarded: a service it needs did not answer; it is still "
        "dead, try "
        "again (that is safe to repeat).",
        f"Dead letter {failing.pk} was not discarded: an error was logged.",
    )
    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert statuses == {
        asks.pk: "dead",
        failing.pk: "dead",
        raced.pk: "replayed",
        fine.pk: "discarded",
    }
    assert "dead letters: ops discarded 1, refused 3" in caplog.messages


@pytest.mark.django_db
def test_prune_deletes_old_handled_rows_and_never_dead_ones():
    long_ago = timezone.now() - timedelta(days=90)
    old_dead = make_letter()
    DeadLetter.objects.filter(pk=old_dead.pk).update(first_failed_at=long_ago)
    old_replayed = make_letter(status=DeadLetter.Status.REPLAYED, handled_at=long_ago)
    old_discarded = make_letter(status=DeadLetter.Status.DISCARDED, handled_at=long_ago)
    recent = make_letter(status=DeadLetter.Status.DISCARDED, handled_at=timezone.now())

    assert dead_letters.dead_letter_prune(older_than_days=30) == 2

    remaining = set(DeadLetter.objects.values_list("pk", flat=True))
    assert remaining == {old_dead.pk, recent.pk}
    assert not {old_replayed.pk, old_discarded.pk} & remaining


@pytest.mark.django_db(transaction=True)
def test_admin_without_the_permission_neither_sees_nor_runs_the_actions(client, broker):
    letter = make_letter()
    client.force_login(staff("viewer"))

    page = client.get(CHANGELIST)
    posted = client.post(CHANGELIST, {"action": "replay_selected", "_selected_action": [letter.pk]})
    discard = client.post(
        CHANGELIST, {"action": "discard_selected", "_selected_action": [letter.pk]}
    )

    assert page.status_code == 200
    assert b"replay_selected" not in page.content
    assert b"discard_selected" not in page.content
    assert (posted.status_code, discard.status_code) == (403, 403)
    assert DeadLetter.objects.get().status == DeadLetter.Status.DEAD
    assert_nothing_enqueued()


@pytest.mark.django_db(transaction=True)
def test_admin_replay_and_discard_report_counts(client, broker):
    first, second, gone = make_letter(), make_letter(), make_letter(status="discarded")
    client.force_login(staff("operator", "replay_deadletter", "discard_deadletter"))

    page = client.get(CHANGELIST)
    replay = client.post(
        CHANGELIST,
        {"action": "replay_selected", "_selected_action": [first.pk, gone.pk]},
        follow=True,
    )
    discard = client.post(
        CHANGELIST, {"action": "discard_selected", "_selected_action": [second.pk]}, follow=True
    )

    assert b"replay_selected" in page.content
    assert b"discard_selected" in page.content
    replay_messages = [str(m) for m in replay.context["messages"]]
    assert replay_messages == [
        "1 dead letter replayed.",
        "1 was not replayed: only dead letters in state 'dead' can be.",
    ]
    assert [str(m) for m in discard.context["messages"]] == ["1 dead letter discarded."]
    assert DeadLetter.objects.get(pk=first.pk).handled_by == "operator"
    assert len(enqueued()) == 1


@pytest.mark.django_db
def test_admin_filters_search_and_a_readable_read_only_detail_page(client):
    letter = make_letter(kwargs={"note": "x"})
    make_letter(reason=DeadLetter.Reason.PERMANENT_ERROR, task_name="other.task")
    client.force_login(staff("viewer"))

    filtered = client.get(CHANGELIST, {"reason": "retries_exhausted"})
    searched = client.get(CHANGELIST, {"q": letter.task_id})
    detail = client.get(f"{CHANGELIST}{letter.pk}/change/")

    assert filtered.context["cl"].result_count == 1
    assert searched.context["cl"].result_count == 1
    assert detail.status_code == 200
    html = detail.content.decode()
    assert "GatewayUnavailable: 503" in html
    assert "<pre" in html
    assert "&quot;note&quot;: &quot;x&quot;" in html
    assert 'name="reason"' not in html  # read-only: no form inputs for the fields
    assert client.get("/admin/jobs/deadletter/add/").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_dlq_command_lists_shows_replays_and_discards(broker, capsys):
    a = make_letter(reason=DeadLetter.Reason.PERMANENT_ERROR)
    b = make_letter()

    call_command("dlq", "list")
    listing = capsys.readouterr().out
    call_command("dlq", "show", str(b.pk))
    shown = capsys.readouterr().out
    call_command("dlq", "replay", "--reason", "retries_exhausted", "--dry-run")
    dry = capsys.readouterr().out
    assert_nothing_enqueued()
    call_command("dlq", "replay", "--reason", "retries_exhausted", "--since", "1h")
    replayed = capsys.readouterr().out
    call_command("dlq", "discard", str(a.pk))
    discarded = capsys.readouterr().out

    assert str(a.pk) in listing and str(b.pk) in listing  # noqa: PT018
    assert "GatewayUnavailable: 503" in shown
    assert dry.strip() == "would replay 1 dead letter(s) (dry run)"
    assert replayed.strip() == "replayed 1 dead letter(s), refused 0"
    assert discarded.strip() == "discarded 1 dead letter(s), refused 0"
    assert DeadLetter.objects.get(pk=b.pk).handled_by.startswith("cli:")
    [message] = assert_enqueued(b.task_name, args=[42])
    assert len(enqueued()) == 1
    assert json.loads(json.dumps(message.headers))["replay_of"] == b.task_id


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "say which rows to replay"),
        (["discard"], "say which rows to discard"),
        (["show", "999"], "no dead letter with id 999"),
        (["list", "--since", "yesterday"], "--since: expected"),
    ],
)
def test_dlq_command_usage_errors_change_nothing(args, message):
    make_letter()

    with pytest.raises(CommandError, match=message):
        call_command("dlq", *args)

    assert DeadLetter.objects.get().status == DeadLetter.Status.DEAD


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["replay", "discard"])
def test_dlq_command_refuses_ids_that_do_not_exist_and_handles_none(action):
    letter = make_letter()
    missing = letter.pk + 1

    with pytest.raises(CommandError, match=f"no dead letter with id {missing};"):
        call_command("dlq", action, str(letter.pk), str(missing))

    assert DeadLetter.objects.get().status == DeadLetter.Status.DEAD
    assert_nothing_enqueued()


@pytest.mark.django_db
def test_a_discards_consequence_calls_as_an_operator_not_behind_the_tasks_turns(monkeypatch):
    from jobs import dependencies

    letter = make_letter(task_name="tests.discard.asks")
    seen: list[bool] = []
    handlers = {"tests.discard.asks": lambda row, actor: seen.append(dependencies._operator.get())}
    monkeypatch.setattr(dead_letters, "_discard_handlers", handlers)

    assert dead_letters.dead_letter_discard(ids=[letter.pk], actor="ops").done == 1

    assert seen == [True]
    assert dependencies._operator.get() is False  # only inside the consequence
