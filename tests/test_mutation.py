"""`make mutate`'s machinery, checked fast: the operators it tries, the tests it picks for
a line, how it reads pytest's verdict, and one real run over a small module whose mutants
a test in the test process, a test's subprocess, or nobody catches."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from cosmic_ray.plugins import operator_names
from cosmic_ray.work_item import TestOutcome as Outcome

import deploy.mutate
from deploy.mutate import (
    TIMED_OUT,
    Score,
    Survivor,
    annotation_spans,
    cannot_make,
    forget_bytecode,
    in_spans,
    judge,
    keeps,
    killers_in,
    prioritize,
    report,
    select_tests,
    signature_spans,
    try_mutant,
)
from tests.helpers import REPO, run_module, wait_until
from tests.mutation_sample import doubled, unchanged

SAMPLE = "tests/mutation_sample.py"
# Taken at import, before any test runs: as `worker_env` is, once per session. The map
# must still credit what the subprocess runs to the test file that started it.
EARLY_ENV = dict(os.environ)


def test_sample_doubles():
    assert doubled(3) == 6
    assert doubled(None) == 0


def test_sample_unchanged():
    assert unchanged(3) == 3


def test_sample_is_large_in_a_subprocess():
    code = "from tests.mutation_sample import is_large; assert is_large(11) and not is_large(10)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=EARLY_ENV, check=True, timeout=60)


def test_one_replacement_per_operator_site_and_the_comparison_boundaries_are_tried():
    names = set(operator_names())
    kept = {name for name in names if keeps(name)}

    assert {
        "core/ReplaceBinaryOperator_Add_Sub",
        "core/ReplaceComparisonOperator_Gt_GtE",
        "core/ReplaceComparisonOperator_Gt_LtE",
        "core/ReplaceUnaryOperator_Delete_Not",
        "core/ReplaceUnaryOperator_Delete_Invert",
        "core/NumberReplacer",
        "core/ReplaceBreakWithContinue",
        "core/ExceptionReplacer",
    } <= kept
    assert (
        not {
            "core/ReplaceBinaryOperator_Add_Mul",
            "core/ReplaceComparisonOperator_Gt_Eq",
            "core/ReplaceUnaryOperator_USub_Invert",
            "core/VariableInserter",
        }
        & kept
    )
    # one replacement per binary operator that has one
    binary = {n for n in kept if n.startswith("core/ReplaceBinaryOperator_")}
    assert len(binary) == len({n.split("_")[1] for n in binary})


def test_a_mutant_inside_a_type_annotation_is_not_tried():
    source = "def f(x: int | None, *, y: str | None = None) -> int | None:\n    return x | 1\n"
    spans = annotation_spans(source)

    assert in_spans((1, 12), spans)  # x: int | None
    assert in_spans((1, 30), spans)  # y: str | None
    assert in_spans((1, 51), spans)  # -> int | None
    assert not in_spans((2, 13), spans)  # x | 1: the code


def test_a_mutant_of_a_parameter_lists_stars_is_not_tried_but_one_in_a_default_is():
    source = "def f(a, *, b=2 * 3, **kw):\n    return lambda *xs: a * 2\n"
    spans = signature_spans(source)

    assert in_spans((1, 9), spans)  # the bare *
    assert not in_spans((1, 16), spans)  # 2 * 3: a default value, code
    assert in_spans((1, 21), spans)  # **kw
    assert in_spans((2, 18), spans)  # lambda *xs
    assert not in_spans((2, 25), spans)  # a * 2: the body


def test_a_mutated_modules_bytecode_is_forgotten_and_no_other(tmp_path):
    module, other = tmp_path / "outbox.py", tmp_path / "outbox_relay.py"
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    for name in (
        "outbox.cpython-311.pyc",
        "outbox.cpython-311.opt-1.pyc",
        "outbox_relay.cpython-311.pyc",
    ):
        (cache / name).write_bytes(b"")

    forget_bytecode(module)

    assert sorted(path.name for path in cache.iterdir()) == ["outbox_relay.cpython-311.pyc"]
    forget_bytecode(other)  # and a module never compiled: nothing to do
    forget_bytecode(tmp_path / "nowhere" / "x.py")


def test_a_line_gets_its_own_tests_first_then_the_files_whose_processes_ran_it():
    lines = {
        3: ["tests/a.py::test_one"],
        5: ["file:tests/b.py", "tests/a.py::test_two"],
        7: ["file:tests/b.py", "file:tests/c.py|tests/c.py::test_task"],  # a worker's task
        9: ["", "file:tests/b.py"],  # run on import (in the test process and a worker)
    }
    durations = {
        "tests/a.py::test_one": 2.0,
        "tests/a.py::test_two": 1.0,
        "tests/c.py::test_task": 1.5,
    }

    assert select_tests(lines, 3, 3) == ["tests/a.py::test_one"]
    assert select_tests(lines, 5, 7) == [
        "tests/a.py::test_two",
        "tests/c.py::test_task",
        "tests/b.py",
    ]
    assert select_tests(lines, 9, 9, durations) == [
        "tests/a.py::test_two",  # fastest first
        "tests/c.py::test_task",
        "tests/a.py::test_one",
        "tests/b.py",
    ]
    assert select_tests(lines, 11, 11) == []  # no test: the mutant survives, said so


def test_a_failed_test_is_named_whole_even_with_spaces_in_its_parameters():
    output = (
        "FAILED tests/a.py::test_limits[zero quantity] - assert 1 == 2\n"
        "FAILED tests/a.py::test_plain - AssertionError: x - y\n"
        "ERROR tests/b.py::test_setup[a-b]\n"
        "ERROR tests/c.py - TypeError: boom\n"
    )

    assert killers_in(output) == [
        "tests/a.py::test_limits[zero quantity]",
        "tests/a.py::test_plain",
        "tests/b.py::test_setup[a-b]",
        "tests/c.py",
        "tests/a.py",
        "tests/b.py",
        "tests/c.py",
    ]


def test_the_tests_that_killed_a_modules_mutants_run_first_then_its_own_then_the_rest():
    output = "...\nFAILED tests/jobs/test_poison.py::test_guard - assert 0 == 1\n1 failed in 3s"
    killers = Counter(killers_in(output))
    tests = ["tests/a.py::test_fast", "tests/jobs/test_poison.py::test_other", "tests/b.py"]

    assert killers_in(output) == [
        "tests/jobs/test_poison.py::test_guard",
        "tests/jobs/test_poison.py",
    ]
    # each a pytest run of its own (pytest-django reorders the tests inside a run)
    assert prioritize(tests, Counter(), "jobs/poison.py") == [
        ["tests/jobs/test_poison.py::test_other"],  # the module's own test file
        ["tests/a.py::test_fast", "tests/b.py"],
    ]
    assert prioritize(["tests/b.py", "tests/jobs/test_poison.py"], killers, "jobs/x.py") == [
        ["tests/jobs/test_poison.py"],  # a file that killed before
        ["tests/b.py"],
    ]
    assert prioritize(["tests/a.py", "tests/b.py"], killers, "jobs/x.py") == [
        ["tests/a.py", "tests/b.py"]
    ]
    # a module's own file is the one of its package, whatever the name shares
    same_names = ["tests/jobs/test_reconcile.py", "tests/shop/test_reconcile.py"]
    assert prioritize(same_names, Counter(), "shop/reconcile.py") == [
        same_names[1:],
        same_names[:1],
    ]
    near = ["tests/shop/test_payments_api.py", "tests/shop/test_payments.py"]
    assert prioritize(near, Counter(), "shop/services/payments.py") == [near[1:], near[:1]]


@pytest.mark.parametrize(
    ("status", "output", "outcome"),
    [
        (0, "1 passed", Outcome.SURVIVED),
        (1, "FAILED tests/a.py::test_one - assert 1 == 2", Outcome.KILLED),
        (2, "ERROR collecting ... /tree/tests/mutation_sample.py:7: TypeError", Outcome.KILLED),
        (2, "ERROR collecting tests/a.py: ModuleNotFoundError: redis", Outcome.INCOMPETENT),
        (4, "ERROR: not found: tests/a.py::test_gone", Outcome.INCOMPETENT),
        (5, "no tests ran", Outcome.INCOMPETENT),
    ],
)
def test_only_a_failing_test_or_the_mutated_module_breaking_kills_a_mutant(status, output, outcome):
    assert judge(status, output, SAMPLE)[0] == outcome


FAILED_ONE = "FAILED tests/a.py::test_one - assert 1 == 2\n1 failed"


def test_the_next_run_of_a_mutants_tests_starts_only_when_the_one_before_passed(
    monkeypatch, tmp_path
):
    calls = []

    def run_tests(tree, module, tests, timeout):
        calls.append(tests)
        fails = any(test.startswith("tests/a.py") for test in tests)
        return (Outcome.KILLED, FAILED_ONE) if fails else (Outcome.SURVIVED, "")

    monkeypatch.setattr(deploy.mutate, "run_tests", run_tests)

    assert try_mutant(tmp_path, SAMPLE, [["tests/b.py"], ["tests/c.py"]], {})[0] == Outcome.SURVIVED
    assert calls == [["tests/b.py"], ["tests/c.py"]]
    calls.clear()
    assert try_mutant(tmp_path, SAMPLE, [["tests/a.py"], ["tests/c.py"]], {})[0] == Outcome.KILLED
    assert calls == [["tests/a.py"], ["tests/a.py::test_one"]]  # the kill, then its confirmation


def test_a_process_a_test_leaves_running_in_its_temporary_directory_is_stopped(
    tmp_path, monkeypatch
):
    # as a test's Redis: started in the test's tmp_path, in a session of its own
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE")  # a tree of one test file, no project
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "test_leaves.py").write_text(
        "import pathlib, subprocess\n"
        "def test_leaves(tmp_path):\n"
        "    proc = subprocess.Popen(['sleep', '300'], cwd=tmp_path, start_new_session=True)\n"
        "    (pathlib.Path.cwd() / 'pid').write_text(str(proc.pid))\n"
    )

    outcome, output = deploy.mutate.run_tests(tree, SAMPLE, ["test_leaves.py"], timeout=120)

    assert outcome == Outcome.SURVIVED, output
    pid = int((tree / "pid").read_text())
    try:
        wait_until(lambda: not _running(pid), timeout=10, what="the test's process to stop")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_process_left_in_a_tree_deleted_since_is_stopped_too(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    proc = subprocess.Popen(["sleep", "300"], cwd=tree, start_new_session=True)
    try:
        shutil.rmtree(tree)  # as the next run does to a stale tree: the cwd reads "(deleted)"

        assert deploy.mutate.stop_leftovers(tree) == [proc.pid]
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return (
        stat.rsplit(")", 1)[1].split()[0] != "Z"
    )  # a zombie has stopped; its parent has not reaped it yet


@pytest.mark.parametrize(
    ("verdicts", "outcome", "runs"),
    [
        ([(Outcome.KILLED, FAILED_ONE), (Outcome.KILLED, FAILED_ONE)], Outcome.KILLED, "SA"),
        ([(Outcome.SURVIVED, "3 passed")], Outcome.SURVIVED, "S"),
        ([(Outcome.KILLED, TIMED_OUT)] * 2, Outcome.KILLED, "SS"),  # a hang hangs twice
        ([(Outcome.KILLED, TIMED_OUT), (Outcome.SURVIVED, "3 passed")], Outcome.SURVIVED, "SS"),
        (
            [
                (Outcome.KILLED, TIMED_OUT),
                (Outcome.KILLED, FAILED_ONE),
                (Outcome.KILLED, FAILED_ONE),
            ],
            Outcome.KILLED,
            "SSA",
        ),
        (
            [
                (Outcome.KILLED, FAILED_ONE),
                (Outcome.SURVIVED, "1 passed"),  # alone, it passed: not confirmed
                (Outcome.KILLED, TIMED_OUT),  # the selection once more overstays once
                (Outcome.SURVIVED, "3 passed"),
            ],
            Outcome.SURVIVED,
            "SASS",
        ),
        (
            [(Outcome.KILLED, FAILED_ONE)]
            + [(Outcome.KILLED, TIMED_OUT)] * 2  # hung alone
            + [(Outcome.KILLED, FAILED_ONE)] * 2,
            Outcome.KILLED,
            "SAASA",
        ),
        (
            [
                (Outcome.KILLED, FAILED_ONE),
                (Outcome.SURVIVED, "1 passed"),  # alone, it passed: not confirmed
                (Outcome.SURVIVED, "3 passed"),  # the whole selection, once more
            ],
            Outcome.SURVIVED,
            "SAS",
        ),
        (
            [(Outcome.KILLED, FAILED_ONE), (Outcome.SURVIVED, "1 passed")] * 2,
            Outcome.INCOMPETENT,
            "SASA",
        ),
        (
            [(Outcome.KILLED, FAILED_ONE), (Outcome.INCOMPETENT, "pytest exit 4: not found")],
            Outcome.INCOMPETENT,
            "SA",
        ),
    ],
    ids=[
        "confirmed",
        "survived",
        "hung",
        "slow-then-passed",
        "slow-then-failed",
        "flaky-then-slow-then-passed",
        "hung-alone-is-no-confirmation",
        "flaky-then-survived",
        "never-confirmed",
        "not-found",
    ],
)
def test_a_kill_counts_only_when_the_failing_test_fails_again_alone(
    monkeypatch, tmp_path, verdicts, outcome, runs
):
    calls = []

    def run_tests(tree, module, tests, timeout):
        calls.append(tests)
        return verdicts[len(calls) - 1]

    monkeypatch.setattr(deploy.mutate, "run_tests", run_tests)

    result, output = try_mutant(tmp_path, SAMPLE, [["tests/a.py", "tests/b.py"]], {})

    assert result == outcome
    # S: the whole selection; A: the failed test alone, on the same mutant
    selection, alone = ["tests/a.py", "tests/b.py"], ["tests/a.py::test_one"]
    assert calls == [selection if run == "S" else alone for run in runs]
    if outcome == Outcome.KILLED and runs == "SA":
        assert output.endswith("confirmed: tests/a.py::test_one failed again, alone")


def test_only_cosmic_rays_known_failure_is_a_mutant_not_made_anything_else_stops_the_run():
    known = AttributeError("'PythonNode' object has no attribute 'value'")

    assert cannot_make("core/ExceptionReplacer", known)
    assert not cannot_make("core/NumberReplacer", known)
    assert not cannot_make("core/ExceptionReplacer", OSError("disk full"))


def test_an_equivalent_entry_explains_no_more_lines_than_it_names():
    survivor = Survivor("jobs/x.py", 3, "core/NumberReplacer", "return 0", "return 1", "passed")
    twice = Score("jobs/x.py", killed=18, survivors=(survivor, replace(survivor, line=9)))

    table, good = report([twice], {survivor.key(): 1}, [])

    assert not good
    assert "jobs/x.py:9 core/NumberReplacer: `return 0` -> `return 1` (equivalent.toml" in table
    assert report([twice], {survivor.key(): 2}, [])[1]  # both named: 18 of 20, explained


@pytest.mark.stack
def test_a_mutation_run_kills_what_a_test_or_a_subprocess_catches_and_lists_the_rest(tmp_path):
    original = (REPO / SAMPLE).read_text()
    explained = tmp_path / "equivalent.toml"
    explained.write_text(
        "[[equivalent]]\n"
        f'module = "{SAMPLE}"\n'
        'operator = "core/ReplaceBinaryOperator_Sub_Add"\n'
        'line = "return amount - 0"\n'
        'mutated = "return amount + 0"\n'
        'why = "x - 0 == x + 0"\n'
    )
    tests = [
        f"tests/test_mutation.py::{name}"
        for name in ("test_sample_doubles", "test_sample_unchanged")
    ] + ["tests/test_mutation.py::test_sample_is_large_in_a_subprocess"]
    workdir = tmp_path / "work"

    def mutate(*tests: str, jobs: int = 1):
        args = ["--workdir", str(workdir), "--equivalent", str(explained), "--jobs", str(jobs)]
        return run_module("deploy.mutate", SAMPLE, *args, "--tests", *tests, timeout=600)

    result = mutate(*tests, jobs=2)  # two mutants at once, each in a tree of its own

    # doubled: `+` made `-`, `if amount` negated, 0 made 1 or -1 (the annotation's `|` is
    # not tried); is_large: `>` made `>=` or `<=`, 10 made 9 or 11 -- caught only because
    # the subprocess imports the mutated file; unchanged: 0 made 1 or -1, and `-` made
    # `+`, which survives (explained); never_called: True made False, survives, listed;
    # loaded: Cosmic Ray's exception operator fails on both names (not made, listed).
    assert result.returncode == 1, result.stdout + result.stderr  # one left unexplained
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| `{SAMPLE}"))
    assert row.split("|")[2:7] == [" 12 ", " 10 ", " 83% ", " 1 ", " 0 "], result.stdout
    assert (
        f"- {SAMPLE}:22 core/ReplaceTrueWithFalse: `return True` -> `return False` "
        "(no test runs this line)"
    ) in result.stdout
    equivalent = f"{SAMPLE}:18 core/ReplaceBinaryOperator_Sub_Add #0: TestOutcome.SURVIVED, "
    assert equivalent + "listed as equivalent: not run" in result.stdout
    assert "Not made (Cosmic Ray's operator failed on the line; not counted):" in result.stdout
    assert result.stdout.count(f"- {SAMPLE}:29 core/ExceptionReplacer: AttributeError") == 2
    coverage = json.loads((workdir / "map.json").read_text())[SAMPLE]
    assert coverage["14"] == ["file:tests/test_mutation.py"]  # is_large's body, by its file
    assert (REPO / SAMPLE).read_text() == original  # the user's tree is never mutated
    for tree in ("tree", "tree-2"):
        assert (workdir / tree / SAMPLE).read_text() == original  # each mutant was undone
    trees = re.findall(r" s, (tree(?:-2)?)\) \[", result.stdout)
    assert sorted(set(trees)) == ["tree", "tree-2"], result.stdout  # both used

    # when: the tests change (here: one fewer), the module does not
    again = mutate(*(test for test in tests if not test.endswith("unchanged")))

    # then: what was killed stays killed; only the two survivors are tried again
    tried = [line for line in again.stdout.splitlines() if "TestOutcome." in line]
    assert len(tried) == 2, again.stdout
    row = next(line for line in again.stdout.splitlines() if line.startswith(f"| `{SAMPLE}"))
    assert row.split("|")[2:7] == [" 12 ", " 10 ", " 83% ", " 1 ", " 0 "], again.stdout
