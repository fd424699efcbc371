"""`make mutate`: break the reliability code on purpose, one small change at a time, and
count the changes the tests catch.

Cosmic Ray makes the mutants (its operators, its session database, its reports) and writes
each one to disk, in a copy of the working tree: the worker processes a test starts import
the mutated module as the test process does, which a tool that switches mutants inside the
test process (mutmut 3) cannot give them. What this module adds is the choice of tests: a
map, built once with coverage, of which tests run each line (in the test process and in
the tasks a worker runs for it: by test; elsewhere in the processes a test started: by
test file), so a mutant runs only the tests that reach its line, fastest first, and `-x`
stops at the first that fails. Only a test failure kills a mutant: pytest's usage errors,
an empty selection or a crash outside the tests are errors of the run, reported as such.

    python -m deploy.mutate                       # every listed module
    python -m deploy.mutate jobs/outbox.py        # one
    python -m deploy.mutate --report              # the scores of the last runs
"""

import argparse
import ast
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosmic_ray.work_item import MutationSpec, TestOutcome, WorkItem

REPO = Path(__file__).resolve().parents[2]
WORKDIR = REPO / "var" / "mutate"
EQUIVALENT = Path(__file__).with_name("equivalent.toml")
MARKER = ".make-mutate"  # a folder with this file is the tool's own, emptied when stale

# The reliability core: the modules whose every mutant must be caught or explained.
MODULES = (
    "jobs/outbox.py",
    "jobs/dead_letters.py",
    "jobs/base.py",
    "jobs/poison.py",
    "jobs/reconcile.py",
    "shop/services/payments.py",
    "shop/services/receipts.py",
    "shop/services/checkout.py",
    "shop/reconcile.py",
)
# The map is built from the suite without the lab, the bench and the whole-stack runs:
# they repeat what the focused tests check, at minutes per test.
MAP_EXCLUDES = (
    "tests/browser",
    "tests/test_bench.py",
    "tests/test_chaos.py",
    "tests/test_make_run.py",
    "tests/test_mutation.py",  # this machinery's own check, on a module of its own
    # Minutes each (a two-minute outage, four workers against a limit), reaching the core
    # modules only as every task does: each survivor would pay for them.
    "tests/test_rate_limits.py",
)
GOAL = 0.85
# A mutant's tests may take their usual time twice over, plus start-up, before it counts
# as killed by timeout (a mutant that makes a test hang is caught, not waited for).
TIMEOUT_BASE, TIMEOUT_FACTOR = 120.0, 2.0
# Mutants tried at once, each in a tree of its own: a mutant's tests mostly wait (on
# workers, the gateway, the broker), and two runs at once keep two cores about busy.
JOBS = 2

# One replacement per operator site is enough to ask "does a test notice this operator?";
# Cosmic Ray offers every replacement (ten for each `+`), which multiplies the run, not
# the finding. Comparisons keep the boundary and the negation.
_KEPT_REPLACEMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "ReplaceBinaryOperator": {
        "Add": ("Sub",),
        "Sub": ("Add",),
        "Mul": ("Div",),
        "Div": ("Mul",),
        "FloorDiv": ("Mul",),
        "Mod": ("FloorDiv",),
        "Pow": ("Mul",),
        "BitOr": ("BitAnd",),
        "BitAnd": ("BitOr",),
        "BitXor": ("BitOr",),
        "LShift": ("RShift",),
        "RShift": ("LShift",),
    },
    "ReplaceComparisonOperator": {
        "Lt": ("LtE", "GtE"),
        "LtE": ("Lt", "Gt"),
        "Gt": ("GtE", "LtE"),
        "GtE": ("Gt", "Lt"),
        "Eq": ("NotEq",),
        "NotEq": ("Eq",),
        "Is": ("IsNot",),
        "IsNot": ("Is",),
    },
    # `not x`, `-x`, `~q` made `x` (named ReplaceUnaryOperator_Delete_Not, ..._Delete_USub)
    "ReplaceUnaryOperator": {"Delete": ("Not", "USub", "Invert")},
}
_DROPPED_OPERATORS = {"core/VariableInserter", "core/VariableReplacer"}  # random, not a finding


def keeps(operator: str) -> bool:
    """Whether the run tries this Cosmic Ray operator (see `_KEPT_REPLACEMENTS`)."""
    if operator in _DROPPED_OPERATORS:
        return False
    family, _, pair = operator.removeprefix("core/").partition("_")
    if family not in _KEPT_REPLACEMENTS:
        return True
    source, _, target = pair.partition("_")
    return target in _KEPT_REPLACEMENTS[family].get(source, ())


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the module's type annotations are: a mutant there (`str | None` made
    `str & None`) changes what mypy reads, not what the code does."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        annotations: list[ast.expr | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            annotations.append(node.returns)
        elif isinstance(node, ast.arg | ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None and annotation.end_lineno is not None:
                end = (annotation.end_lineno, annotation.end_col_offset or 0)
                spans.append(((annotation.lineno, annotation.col_offset), end))
    return spans


def signature_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the functions' parameter lists are, but for their default values: Cosmic Ray
    takes the bare `*` of `def f(a, *, b)` (and of `*args`, `**kwargs`) for an operator,
    and its "mutant" only changes how a caller may pass the arguments."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        body: ast.stmt | ast.expr
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[0]
        elif isinstance(node, ast.Lambda):
            body = node.body
        else:
            continue
        start = (node.lineno, node.col_offset)
        defaults = [d for d in (*node.args.defaults, *node.args.kw_defaults) if d is not None]
        for default in sorted(defaults, key=lambda d: (d.lineno, d.col_offset)):
            spans.append((start, (default.lineno, default.col_offset)))
            start = (default.end_lineno or default.lineno, default.end_col_offset or 0)
        spans.append((start, (body.lineno, body.col_offset)))
    return spans


def in_spans(
    position: tuple[int, int], spans: Iterable[tuple[tuple[int, int], tuple[int, int]]]
) -> bool:
    return any(start <= position < end for start, end in spans)


# -- the tree the mutants are written to ---------------------------------------------------


def _project_files() -> list[str]:
    """The working tree's files as git sees them: tracked (with uncommitted edits) and new."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


# This driver's own code is not part of what the tests see: changing how it orders or
# judges keeps the map and the sessions (`--fresh` when a change should not).
_DRIVER = {"deploy/mutate/__init__.py", "deploy/mutate/equivalent.toml"}


def fingerprint(files: Iterable[str], tests: Iterable[str]) -> str:
    """What a map and its sessions were made from: every file's content and the tests the
    map ran (a start script or a template changes what a test sees as much as code)."""
    digest = hashlib.sha256(json.dumps(sorted(tests)).encode())
    for name in sorted(set(files) - _DRIVER):
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def claim(workdir: Path) -> None:
    """Make `workdir` the tool's own: a new or empty folder, or one it made before (never
    `--workdir .`: it empties the folder when the sources change)."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(f"mutate: {workdir} is not empty and not a make mutate folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()


def _digests(files: Iterable[str]) -> dict[str, str]:
    return {
        name: hashlib.sha256((REPO / name).read_bytes()).hexdigest()[:16]
        for name in files
        if name.endswith(".py")
    }


def prepare(workdir: Path, tests: list[str], *, fresh: bool = False, copies: int = 1) -> list[Path]:
    """A copy of the working tree in `workdir/tree` (the user's own files are never
    mutated). When anything changed since the last run, the map is thrown away; the
    session of a module whose own source did not change is kept as `.previous`, so its
    killed mutants stay killed and only the others run again (a new test written to kill
    a survivor costs one module's survivors, not every module's run). `fresh`: nothing
    is kept. `copies`: that many trees (`tree`, `tree-2`, ...), one per mutant tried at
    once."""
    files = _project_files()
    stamp = fingerprint(files, tests)
    stamp_file, digests_file = workdir / "fingerprint", workdir / "sources.json"
    for tree in workdir.glob("tree*"):  # before any tree is deleted (see stop_leftovers)
        stop_leftovers(tree)
    if fresh or not stamp_file.exists() or stamp_file.read_text() != stamp:
        before = {} if fresh or not digests_file.exists() else json.loads(digests_file.read_text())
        now = _digests(files)
        kept = {f"{_slug(m)}.sqlite" for m, digest in before.items() if now.get(m) == digest}
        for entry in workdir.iterdir():
            if entry.name == MARKER:
                continue
            if entry.suffix in (".sqlite", ".previous") and (
                entry.with_suffix(".sqlite").name in kept
            ):
                entry.rename(entry.with_suffix(".previous"))
            else:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    trees = [workdir / "tree"] + [workdir / f"tree-{n}" for n in range(2, copies + 1)]
    for tree in trees:
        for cache in tree.rglob("__pycache__"):  # compiled from other sources (see above)
            shutil.rmtree(cache, ignore_errors=True)
        for name in files:
            target = tree / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
    digests_file.write_text(json.dumps(_digests(files)))
    stamp_file.write_text(stamp)
    return trees


def _env() -> dict[str, str]:
    # The interpreter is this virtualenv's; its commands (celery, gunicorn) come first on
    # PATH. No bytecode: a mutant is written within the second of the original, and a
    # .pyc keyed on the source's mtime could hide it. No coverage: the map's settings
    # must not leak into a mutant's run (or a run started from inside the map's).
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG", "MUTATE_COVERAGE_DIR"):
        env.pop(name, None)
    return env


def forget_bytecode(module: Path) -> None:
    """Delete the module's compiled bytecode: a process a test starts with an environment
    of its own may write some (PYTHONDONTWRITEBYTECODE gone), and a .pyc is trusted on
    the source's mtime, to the second, and size: a mutant of the same size written back
    within the second (`20` made `21`) would run as the code compiled before it."""
    for compiled in (module.parent / "__pycache__").glob(f"{module.stem}.*.pyc"):
        compiled.unlink(missing_ok=True)


def pytest_command(tree: Path) -> list[str]:
    """pytest in `tree`, its temporary files in the tree too (`--basetemp`, emptied by
    each run): a Redis a test starts runs in its data directory there, so
    `stop_leftovers` finds it like every other process the run left behind."""
    basetemp = f"--basetemp={tree / '.pytest-tmp'}"
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", basetemp]


def stop_leftovers(tree: Path) -> list[int]:
    """SIGKILL every process still running in the tree (a worker, the gateway, a Redis a
    test started, in a session of its own) once a mutant's tests are over, and when a
    run starts (a run killed mid-mutant left its processes there): a test killed at its
    timeout never tore its fixtures down, and a worker with the old mutant loaded would
    take the next run's messages."""
    own = {os.getpid(), os.getppid()}
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            # A deleted folder reads "<path> (deleted)": the tree may have been removed
            cwd = Path(os.readlink(entry / "cwd").removesuffix(" (deleted)"))
        except OSError:
            continue  # gone, or not ours to read
        if cwd == tree or tree in cwd.parents:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


# -- the map: which tests run each line ----------------------------------------------------

Coverage = dict[str, dict[int, list[str]]]  # module -> line -> contexts
SUBPROCESS_PREFIX = "file:"  # the context of a line run by a process a test started


def build_map(tree: Path, workdir: Path, tests: list[str], modules: list[str]) -> Coverage:
    """Run `tests` once under coverage and keep, for each line of `modules`, the contexts
    that ran it. Stops the run if the unmutated tree does not pass its tests."""
    import coverage

    out = workdir / "coverage"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [*pytest_command(tree), "-p", "deploy.mutate.coverage_plugin", *tests]
    command += [f"--ignore={path}" for path in MAP_EXCLUDES if tests == ["tests"]]
    print(f"mutate: mapping which tests run which line ({' '.join(tests)})", flush=True)
    started = time.monotonic()
    env = {**_env(), "MUTATE_COVERAGE_DIR": str(out), "MUTATE_MODULES": ",".join(modules)}
    result = subprocess.run(command, cwd=tree, env=env)
    stop_leftovers(tree)
    if result.returncode != 0:
        raise SystemExit(f"mutate: the tests fail without any mutant (exit {result.returncode})")
    data = coverage.CoverageData(basename=str(out / ".coverage"))
    coverage.Coverage(data_file=str(out / ".coverage"), config_file=False).combine([str(out)])
    data.read()
    lines: Coverage = {}
    for module in modules:
        contexts = data.contexts_by_lineno(str((tree / module).resolve()))
        lines[module] = {line: sorted(names) for line, names in contexts.items()}
    (workdir / "map.json").write_text(json.dumps(lines))
    shutil.copy(out / "durations.json", workdir / "durations.json")
    print(f"mutate: map built in {time.monotonic() - started:.0f} s", flush=True)
    return lines


def load_map(workdir: Path) -> Coverage | None:
    path = workdir / "map.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return {
        module: {int(line): names for line, names in by_line.items()}
        for module, by_line in raw.items()
    }


def load_durations(workdir: Path) -> dict[str, float]:
    path = workdir / "durations.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def select_tests(
    lines: dict[int, list[str]], first: int, last: int, durations: dict[str, float] | None = None
) -> list[str]:
    """The pytest arguments for a mutant on lines `first`..`last`: the tests that ran
    those lines (in the test process, or in a task a worker ran for them), fastest
    first, then the test files whose processes ran them otherwise, quickest file first
    (`pytest -x` stops at the first failure: the order is the run's speed). A line run
    on import (a constant, a decorator) may matter to any test that reaches the module."""
    durations = durations or {}
    contexts = {name for line in range(first, last + 1) for name in lines.get(line, ())}
    if "" in contexts:
        contexts |= {name for names in lines.values() for name in names}
    node_ids, files = set(), set()
    for context in contexts:
        static, _, dynamic = context.partition("|")  # a worker's task: "file:...|node id"
        if dynamic:
            node_ids.add(dynamic)
        elif static.startswith(SUBPROCESS_PREFIX):
            files.add(static.removeprefix(SUBPROCESS_PREFIX))
        elif static:
            node_ids.add(static)

    def file_time(path: str) -> float:
        return sum(t for node, t in durations.items() if node.startswith(path + "::"))

    return sorted(node_ids, key=lambda n: (durations.get(n, 0.0), n)) + sorted(
        files, key=lambda f: (file_time(f), f)
    )


# pytest's short summary: "FAILED tests/a.py::test_x[zero quantity] - AssertionError: ..."
# (a parametrized id may hold spaces; the reason follows " - ").
_FAILED = re.compile(r"^(?:FAILED|ERROR) ([^\s\[]+(?:\[.*?\])?)(?: - |$)", re.MULTILINE)


def killers_in(output: str) -> list[str]:
    """The tests a killed mutant's run names as failed (and their files)."""
    nodes = [match.group(1) for match in _FAILED.finditer(output)]
    return nodes + sorted({node.split("::", 1)[0] for node in nodes})


def prioritize(tests: list[str], killers: Counter[str], module: str) -> list[list[str]]:
    """The mutant's tests as pytest runs, one after the other until one fails: first the
    tests that killed this module's mutants so far (most kills first) and those of its
    own test file (tests/jobs/test_poison.py for jobs/poison.py, tests/shop/test_payments.py
    for shop/services/payments.py), then the rest in their order. A mutant that disables a
    protection passes every test that merely runs the line, and only the test of that
    protection, often slow, fails. Two runs, not one ordered list: pytest-django reorders
    each run's tests (database tests first, the transactional ones after them, the rest
    last), and a quick test of the protection would wait behind every transactional test
    of the selection."""
    own_name, package = f"test_{Path(module).stem}.py", Path(module).parts[:1]

    def own(test: str) -> bool:
        path = Path(test.split("::", 1)[0])
        return path.name == own_name and path.parts[1:2] == package

    def rank(indexed: tuple[int, str]) -> tuple[int, int, int]:
        index, test = indexed
        return (-killers[test], 0 if own(test) else 1, index)

    ordered = [test for _, test in sorted(enumerate(tests), key=rank)]
    first = [test for test in ordered if killers[test] or own(test)]
    rest = [test for test in ordered if test not in first]
    return [stage for stage in (first, rest) if stage]


def timeout_for(tests: list[str], durations: dict[str, float]) -> float:
    usual = sum(
        t
        for node, t in durations.items()
        if any(node == test or node.startswith(test + "::") for test in tests)
    )
    return TIMEOUT_BASE + TIMEOUT_FACTOR * usual


# -- the mutants: Cosmic Ray's session, one per module -------------------------------------


def _slug(module: str) -> str:
    return module.replace("/", "__").removesuffix(".py")


def session_for(tree: Path, workdir: Path, module: str) -> Path:
    """The module's Cosmic Ray session: created with `cosmic-ray init` (every mutant its
    operators find), then the mutants this run does not try marked skipped; under a
    temporary name until both are done. An existing session (same sources) is resumed
    where it stopped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    session = workdir / f"{_slug(module)}.sqlite"
    if session.exists():
        return session
    config = workdir / f"{_slug(module)}.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {TIMEOUT_BASE}\n"
        "excluded-modules = []\n"
        'test-command = "false"  # unused: each mutant gets the tests of its lines\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    partial = session.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    cosmic_ray = Path(sys.executable).with_name("cosmic-ray")
    subprocess.run([str(cosmic_ray), "init", str(config), str(partial)], cwd=tree, check=True)
    source = (tree / module).read_text()
    spans = annotation_spans(source) + signature_spans(source)
    with use_db(str(partial), WorkDB.Mode.open) as db:
        skipped = [
            item.job_id
            for item in db.work_items
            if not keeps(item.mutations[0].operator_name)
            or in_spans(tuple(item.mutations[0].start_pos), spans)
        ]
        db.set_multiple_results(
            skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not tried")
        )
        previous = session.with_suffix(".previous")
        if previous.exists():  # the module is unchanged: what was killed stays killed
            for item in _killed_before(previous, list(db.pending_work_items)):
                db.set_result(
                    item.job_id,
                    WorkResult(
                        worker_outcome=WorkerOutcome.NORMAL,
                        test_outcome=TestOutcome.KILLED,
                        output=KILLED_BEFORE,
                    ),
                )
            previous.unlink()
    partial.rename(session)
    return session


KILLED_BEFORE = "killed in an earlier run (the module has not changed since)"


def _killed_before(previous: Path, pending: list["WorkItem"]) -> list["WorkItem"]:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    def key(item: "WorkItem") -> tuple[str, int, tuple[int, int]]:
        mutation = item.mutations[0]
        return (mutation.operator_name, mutation.occurrence, tuple(mutation.start_pos))

    with use_db(str(previous), WorkDB.Mode.open) as old:
        killed = {
            key(item)
            for item, result in old.completed_work_items
            if result.test_outcome == TestOutcome.KILLED
        }
    return [item for item in pending if key(item) in killed]


def _position(item: "WorkItem") -> tuple[int, int, str, int]:
    mutation = item.mutations[0]
    return (*mutation.start_pos, mutation.operator_name, mutation.occurrence)


TIMED_OUT = "timed out"  # the output of a mutant killed by its timeout
_stopping = threading.Event()  # Ctrl-C: every running pytest is stopped, its mutant undone


def run_tests(
    tree: Path, module: str, tests: list[str], timeout: float
) -> tuple["TestOutcome", str]:
    """One pytest run of a mutant's tests, judged by pytest's exit status: tests failed
    (1) kills it; a collection error (2) kills it only when the mutated module raised
    (the mutant broke its import); a usage error, an internal error or no test
    collected (3, 4, 5) is an error of this run, never a kill."""
    from cosmic_ray.work_item import TestOutcome

    if _stopping.is_set():  # Ctrl-C came between two runs of this mutant: start no other
        raise KeyboardInterrupt
    command = [*pytest_command(tree), "-x", *tests]
    proc = subprocess.Popen(
        command,
        cwd=tree,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            output, _ = proc.communicate(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if _stopping.is_set() or time.monotonic() >= deadline:
                break
    if proc.returncode is None:  # the timeout, or Ctrl-C: nothing of this run lives on
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        stop_leftovers(tree)
        if _stopping.is_set():
            raise KeyboardInterrupt
        return TestOutcome.KILLED, TIMED_OUT
    stop_leftovers(tree)
    return judge(proc.returncode, output.decode(errors="replace"), module)


def judge(status: int, output: str, module: str) -> tuple["TestOutcome", str]:
    """What a pytest exit status says of a mutant (see `run_tests`), and the output kept."""
    from cosmic_ray.work_item import TestOutcome

    tail = "\n".join(output.splitlines()[-60:])
    if status == 0:
        return TestOutcome.SURVIVED, tail
    if status == 1 or (status == 2 and module in output):
        return TestOutcome.KILLED, tail
    return TestOutcome.INCOMPETENT, f"pytest exit {status}:\n{tail}"


CONFIRMED = "confirmed: {} failed again, alone"
EQUIVALENT_NOT_RUN = "listed as equivalent: not run"


def _changed_line(diff: str, original: str, mutation: "MutationSpec") -> tuple[str, str]:
    """The mutated line before and after, stripped (as equivalent.toml keys them)."""
    added = [
        row[1:].strip()
        for row in diff.splitlines()
        if row.startswith("+") and not row.startswith("+++")
    ]
    return original.splitlines()[mutation.start_pos[0] - 1].strip(), added[0] if added else ""


def cannot_make(operator: str, error: Exception) -> bool:
    """Whether `error`, raised while writing a mutant, is the one known failure of Cosmic
    Ray's own (its exception operator on a dotted name inside a tuple, `except (a.B, C)`:
    parso gives it a node without a value): that mutant is listed as not made. Anything
    else stops the run: a mutant quietly left out would raise the score."""
    return operator == "core/ExceptionReplacer" and isinstance(error, AttributeError)


def try_mutant(
    tree: Path, module: str, stages: list[list[str]], durations: dict[str, float]
) -> tuple["TestOutcome", str]:
    """Run a mutant's tests (already written to `tree`), stage after stage (`prioritize`)
    until one fails; a kill by a failing test counts once that test, run again alone,
    fails again: a test that fails now and then on a busy machine (every test passed
    once without any mutant, in the map's run) must not pass for a kill. Unconfirmed,
    the whole selection runs once more, and its verdict stands (an unconfirmed kill then
    is an error of the run). A run that outlived its timeout is run once more too: a
    hang kills when it hangs twice (a busy machine can make a run overstay once)."""
    from cosmic_ray.work_item import TestOutcome

    def run(tests: list[str]) -> tuple[TestOutcome, str]:
        timeout = timeout_for(tests, durations)
        outcome, output = run_tests(tree, module, tests, timeout)
        if output == TIMED_OUT:  # a hang hangs again; a run a busy machine slowed does not
            outcome, output = run_tests(tree, module, tests, timeout)
        return outcome, output

    for attempt in (1, 2):
        for tests in stages:
            outcome, output = run(tests)
            if outcome != TestOutcome.SURVIVED:
                break
        failed = [node for node in killers_in(output) if "::" in node][:1]
        if outcome != TestOutcome.KILLED or output == TIMED_OUT or not failed:
            return outcome, output  # survived, an error, a hang or a broken import
        again, alone = run(failed)
        if again == TestOutcome.KILLED and alone != TIMED_OUT:  # it failed, not hung
            return outcome, f"{output}\n{CONFIRMED.format(failed[0])}"
        if again == TestOutcome.INCOMPETENT:  # pytest could not run it by its node id
            return again, f"{failed[0]} could not run alone: {alone}"
        if attempt == 2:
            return (
                TestOutcome.INCOMPETENT,
                f"unconfirmed: {failed[0]} failed, then passed\n{output}",
            )
    raise AssertionError("unreachable")


def run_mutants(
    trees: list[Path],
    session: Path,
    module: str,
    lines: dict[int, list[str]],
    durations: dict[str, float],
    *,
    limit: int | None = None,
    explained: frozenset[tuple[str, str, str, str]] = frozenset(),
) -> None:
    """Write each pending mutant to a tree of its own (Cosmic Ray's `use_mutation`, which
    puts the original back whatever happens), run the tests that reach its lines,
    record what they said in the session; as many mutants at once as there are trees
    (each pytest run has its own database, Redis, gateway and workers: the tests mostly
    wait on them, so two at once on two cores take little more than one)."""
    from cosmic_ray.mutating import use_mutation
    from cosmic_ray.plugins import get_operator
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    def attempt(tree: Path, item: "WorkItem", stages: list[list[str]]) -> WorkResult:
        [mutation] = item.mutations
        operator = get_operator(mutation.operator_name)(**(mutation.operator_args or {}))
        path = tree / mutation.module_path  # the session names it relative to the tree
        with ExitStack() as undo:
            undo.callback(forget_bytecode, path)  # after the original is back, too
            try:
                original, mutated = undo.enter_context(
                    use_mutation(path, operator, mutation.occurrence)
                )
            except Exception as exc:
                if not cannot_make(mutation.operator_name, exc):
                    raise  # a failure of this run's own, not a mutant to list
                return WorkResult(worker_outcome=WorkerOutcome.EXCEPTION, output=f"{exc!r}")
            forget_bytecode(path)
            if mutated is None:  # Cosmic Ray found nothing to change there
                return WorkResult(worker_outcome=WorkerOutcome.NO_TEST)
            diff = "".join(
                difflib.unified_diff(
                    original.splitlines(keepends=True),
                    mutated.splitlines(keepends=True),
                    fromfile=module,
                    tofile=module,
                    n=0,
                )
            )
            key = (module, mutation.operator_name, *_changed_line(diff, original, mutation))
            if key in explained:  # no test can kill it (equivalent.toml says why)
                outcome, output = TestOutcome.SURVIVED, EQUIVALENT_NOT_RUN
            elif stages:
                outcome, output = try_mutant(tree, module, stages, durations)
            else:
                outcome, output = TestOutcome.SURVIVED, "no test runs this line"
            return WorkResult(
                worker_outcome=WorkerOutcome.NORMAL, test_outcome=outcome, output=output, diff=diff
            )

    with use_db(str(session), WorkDB.Mode.open) as db:
        killers: Counter[str] = Counter()
        for _, done in db.completed_work_items:
            if done.test_outcome == TestOutcome.KILLED:
                killers.update(killers_in(done.output or ""))
        pending = iter(enumerate(sorted(db.pending_work_items, key=_position)[:limit], 1))
        total = min(db.num_work_items - db.num_results, limit or db.num_work_items)
        free = list(reversed(trees))
        running: dict[Future[WorkResult], tuple[Path, WorkItem, int, int, float]] = {}
        with ThreadPoolExecutor(max_workers=len(trees)) as pool:
            try:
                while True:
                    while free and (next_item := next(pending, None)) is not None:
                        number, item = next_item
                        [mutation] = item.mutations
                        tests = select_tests(
                            lines, mutation.start_pos[0], mutation.end_pos[0], durations
                        )
                        stages = prioritize(tests, killers, module)
                        tree = free.pop()
                        future = pool.submit(attempt, tree, item, stages)
                        running[future] = (tree, item, number, len(tests), time.monotonic())
                    if not running:
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        tree, item, number, selected, started = running.pop(future)
                        free.append(tree)
                        result = future.result()
                        db.set_result(item.job_id, result)
                        if result.test_outcome == TestOutcome.KILLED:
                            killers.update(killers_in(result.output or ""))
                        mutation = item.mutations[0]
                        listed = result.output == EQUIVALENT_NOT_RUN
                        print(
                            f"mutate: {module}:{mutation.start_pos[0]} "
                            f"{mutation.operator_name} #{mutation.occurrence}: "
                            f"{result.test_outcome or result.worker_outcome}"
                            f"{', ' + EQUIVALENT_NOT_RUN if listed else ''} "
                            f"({selected} tests, {time.monotonic() - started:.0f} s, "
                            f"{tree.name}) "
                            f"[{number}/{total}]",
                            flush=True,
                        )
            except BaseException:  # Ctrl-C: stop every run, undo every mutant, then stop
                _stopping.set()
                for future in running:
                    future.exception()  # waits for its mutant to be undone
                raise


# -- the score -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Survivor:
    module: str
    line: int
    operator: str
    source: str  # the original line, stripped
    change: str  # the mutated line, stripped ("" when the mutant removed it)
    why: str  # "no test runs this line", or the tests that passed

    def key(self) -> tuple[str, str, str, str]:
        return (self.module, self.operator, self.source, self.change)


@dataclass
class Score:
    module: str
    killed: int = 0
    survivors: tuple[Survivor, ...] = ()
    errors: tuple[str, ...] = ()
    pending: int = 0
    unmade: tuple[str, ...] = ()  # mutants Cosmic Ray failed to make (not counted)

    @property
    def tried(self) -> int:
        return self.killed + len(self.survivors)


def equivalents(path: Path = EQUIVALENT) -> dict[tuple[str, str, str, str], int]:
    """The survivors explained as equivalent (no test could tell them from the original),
    each an `[[equivalent]]` table: module, operator, line (the original, stripped),
    mutated (the mutant's line, stripped), why, and `sites` (how many lines of the
    module it explains, 1 unless it says): the key for each, and its sites."""
    if not path.exists():
        return {}
    tables = tomllib.loads(path.read_text()).get("equivalent", [])
    return {
        (t["module"], t["operator"], t["line"], t["mutated"]): int(t.get("sites", 1))
        for t in tables
    }


def score(tree: Path, session: Path, module: str) -> Score:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    source_text = (tree / module).read_text()
    result = Score(module)
    survivors, errors, unmade = [], [], []
    with use_db(str(session), WorkDB.Mode.open) as db:
        result.pending = sum(1 for _ in db.pending_work_items)
        for item, outcome in db.completed_work_items:
            mutation = item.mutations[0]
            line = mutation.start_pos[0]
            if outcome.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
                continue  # not tried: filtered out, or nothing for Cosmic Ray to change
            if outcome.worker_outcome == WorkerOutcome.EXCEPTION:
                unmade.append(f"{module}:{line} {mutation.operator_name}: {outcome.output}")
                continue
            if outcome.test_outcome == TestOutcome.SURVIVED:
                source, change = _changed_line(outcome.diff or "", source_text, mutation)
                why = (outcome.output or "").strip().splitlines()[-1:] or [""]
                survivors.append(
                    Survivor(module, line, mutation.operator_name, source, change, why[0])
                )
            elif outcome.test_outcome == TestOutcome.KILLED:
                result.killed += 1
            else:
                first = (outcome.output or "").splitlines()[:1] or [""]
                errors.append(f"{module}:{line} {mutation.operator_name}: {first[0]}")
    result.survivors = tuple(sorted(survivors, key=lambda s: (s.line, s.operator)))
    result.errors = tuple(errors)
    result.unmade = tuple(unmade)
    return result


def report(
    scores: list[Score], explained: dict[tuple[str, str, str, str], int], missing: list[str]
) -> tuple[str, bool]:
    """The table (and every survivor no entry of equivalent.toml explains, every error);
    whether every module met the goal with nothing unexplained, pending or in error."""
    rows = ["| module | mutants tried | killed | score | explained as equivalent | errors |"]
    rows.append("|---|---:|---:|---:|---:|---:|")
    unexplained = []
    good = not missing
    for s in scores:
        # An entry explains as many survivors as it names sites: a new line that happens
        # to read the same (another `return 0`) is not explained by it unseen.
        matches = Counter(v.key() for v in s.survivors if v.key() in explained)
        fits = {key for key, found in matches.items() if found <= explained[key]}
        known = [v for v in s.survivors if v.key() in fits]
        unexplained += [
            v
            if v.key() not in matches
            else dataclasses.replace(
                v,
                why=f"equivalent.toml explains {explained[v.key()]} such line(s), "
                f"{matches[v.key()]} survived",
            )
            for v in s.survivors
            if v.key() not in fits
        ]
        # Killed of all tried: an equivalent mutant counts against the score, so that
        # explaining survivors away can never reach the goal (every survivor must be
        # explained as well).
        ratio = s.killed / s.tried if s.tried else 0.0
        rows.append(
            f"| `{s.module}` | {s.tried} | {s.killed} | {ratio:.0%} | {len(known)} "
            f"| {len(s.errors)} |" + (f" ({s.pending} pending)" if s.pending else "")
        )
        good = good and not s.pending and not s.errors and s.tried > 0 and ratio >= GOAL
    rows += [f"| `{m}` | not run | | | | |" for m in missing]
    rows += ["", f"score: killed / tried; the goal: {GOAL:.0%} in each, every survivor explained"]
    good = good and not unexplained
    lines = rows + (["", "Survivors not explained:"] if unexplained else [])
    lines += [
        f"- {v.module}:{v.line} {v.operator}: `{v.source}` -> `{v.change}` ({v.why})"
        for v in unexplained
    ]
    errors = [error for s in scores for error in s.errors]
    lines += (["", "Errors (neither killed nor survived):"] if errors else []) + [
        f"- {error}" for error in errors
    ]
    unmade = [mutant for s in scores for mutant in s.unmade]
    lines += (
        ["", "Not made (Cosmic Ray's operator failed on the line; not counted):"] if unmade else []
    ) + [f"- {mutant}" for mutant in unmade]
    return "\n".join(lines), good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.mutate", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all {len(MODULES)}")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="the tests the map runs")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--limit", type=int, help="try at most this many mutants per module")
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help=f"mutants tried at once (default {JOBS})"
    )
    parser.add_argument("--report", action="store_true", help="print the last scores; run nothing")
    parser.add_argument(
        "--equivalent", type=Path, default=EQUIVALENT, help="the survivors explained as equivalent"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="try every mutant again, even those killed before"
    )
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if not (REPO / m).is_file() or not m.endswith(".py")]
    if unknown:
        parser.error(f"no such module: {', '.join(unknown)}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    workdir = args.workdir.resolve()
    claim(workdir)
    if args.report:
        tree = workdir / "tree"
        sessions = {m: workdir / f"{_slug(m)}.sqlite" for m in modules}
        scores = [score(tree, s, m) for m, s in sessions.items() if s.exists()]
        missing = [m for m, s in sessions.items() if not s.exists()]
    else:
        trees = prepare(workdir, args.tests, fresh=args.fresh, copies=args.jobs)
        tree = trees[0]
        lines = load_map(workdir)
        if lines is None or any(m not in lines for m in modules):
            # one map for every listed module: the next module's run needs no new one
            lines = build_map(tree, workdir, args.tests, sorted({*modules, *MODULES}))
        scores, missing = [], []
        for module in modules:
            session = session_for(tree, workdir, module)
            durations = load_durations(workdir)
            run_mutants(
                trees,
                session,
                module,
                lines[module],
                durations,
                limit=args.limit,
                explained=frozenset(equivalents(args.equivalent)),
            )
            scores.append(score(tree, session, module))
    table, good = report(scores, equivalents(args.equivalent), missing)
    print(table)
    return 0 if good else 1
