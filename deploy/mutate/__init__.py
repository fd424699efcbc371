"""`make mutate`: break the reliability code on purpose, one small change at a time, and
count the changes the tests catch.

Cosmic Ray makes the mutants (its operators, its session database, its reports) and writes
each one to disk, in a copy of the working tree: the worker processes a test starts import
the mutated module as the test process does, which a tool that switches mutants inside the
test process (mutmut 3) cannot give them. What this module adds is the choice of tests: a
map, built once with coverage, of which tests run each line (in the test process: by test;
in the processes a test starts: by test file), so a mutant runs only the tests that reach
its line, and `-x` stops at the first that fails.

    python -m deploy.mutate                       # every listed module
    python -m deploy.mutate jobs/outbox.py        # one
    python -m deploy.mutate --report              # the scores of the last runs
"""

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosmic_ray.work_item import WorkItem

REPO = Path(__file__).resolve().parents[2]
WORKDIR = REPO / "var" / "mutate"
EQUIVALENT = Path(__file__).with_name("equivalent.txt")

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
)
GOAL = 0.85
TIMEOUT = 900.0  # a mutant that hangs a test is caught by the tests' own deadlines first

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
    # `not x` made `x`, `-x` made `x` (named ReplaceUnaryOperator_Delete_Not, ..._Delete_USub)
    "ReplaceUnaryOperator": {"Delete": ("Not", "USub")},
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


def fingerprint(files: Iterable[str]) -> str:
    """What a map and a session were made from: every Python file's content."""
    digest = hashlib.sha256()
    for name in sorted(files):
        if name.endswith(".py"):
            digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return digest.hexdigest()[:16]


def prepare(workdir: Path) -> Path:
    """A copy of the working tree in `workdir/tree` (the user's own files are never
    mutated); a map or session made from other sources is thrown away."""
    files = _project_files()
    stamp = fingerprint(files)
    stamp_file = workdir / "fingerprint"
    if not stamp_file.exists() or stamp_file.read_text() != stamp:
        shutil.rmtree(workdir, ignore_errors=True)
    tree = workdir / "tree"
    for name in files:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    stamp_file.write_text(stamp)
    return tree


def _env() -> dict[str, str]:
    # The interpreter is this virtualenv's; its commands (celery, gunicorn) come first on
    # PATH. No bytecode: a mutant is written within the second of the original, and a
    # .pyc keyed on the source's mtime could hide it.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("COVERAGE_PROCESS_START", None)
    return env


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
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "deploy.mutate.coverage_plugin", *tests]
    command += [f"--ignore={path}" for path in MAP_EXCLUDES if not tests or tests == ["tests"]]
    print(f"mutate: mapping which tests run which line ({' '.join(tests)})", flush=True)
    started = time.monotonic()
    env = {**_env(), "MUTATE_COVERAGE_DIR": str(out), "MUTATE_MODULES": ",".join(modules)}
    result = subprocess.run(command, cwd=tree, env=env)
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
    those lines in the test process (precise), fastest first, then the test files whose
    processes ran them, quickest file first (`pytest -x` stops at the first failure, so
    the order is the run's speed). A line run only on import is reached by every test
    that reaches the module."""
    durations = durations or {}
    contexts = {name for line in range(first, last + 1) for name in lines.get(line, ())}
    if contexts and contexts <= {""}:
        contexts = {name for names in lines.values() for name in names}
    node_ids = [name for name in contexts if name and not name.startswith(SUBPROCESS_PREFIX)]
    files = [
        name.removeprefix(SUBPROCESS_PREFIX)
        for name in contexts
        if name.startswith(SUBPROCESS_PREFIX)
    ]

    def file_time(path: str) -> float:
        return sum(t for node, t in durations.items() if node.startswith(path + "::"))

    return sorted(node_ids, key=lambda n: (durations.get(n, 0.0), n)) + sorted(
        files, key=lambda f: (file_time(f), f)
    )


# -- the mutants: Cosmic Ray's session, one per module -------------------------------------


def _slug(module: str) -> str:
    return module.replace("/", "__").removesuffix(".py")


def session_for(tree: Path, workdir: Path, module: str) -> Path:
    """The module's Cosmic Ray session: created with `cosmic-ray init` (every mutant its
    operators find), then the mutants this run does not try marked skipped. An existing
    session (same sources) is resumed where it stopped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    session = workdir / f"{_slug(module)}.sqlite"
    if session.exists():
        return session
    config = workdir / f"{_slug(module)}.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {TIMEOUT}\n"
        "excluded-modules = []\n"
        'test-command = "false"  # unused: each mutant gets the tests of its lines\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    cosmic_ray = Path(sys.executable).with_name("cosmic-ray")
    subprocess.run([str(cosmic_ray), "init", str(config), str(session)], cwd=tree, check=True)
    spans = annotation_spans((tree / module).read_text())
    with use_db(str(session), WorkDB.Mode.open) as db:
        skipped = [
            item.job_id
            for item in db.work_items
            if not keeps(item.mutations[0].operator_name)
            or in_spans(tuple(item.mutations[0].start_pos), spans)
        ]
        db.set_multiple_results(
            skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not tried")
        )
    return session


def _position(item: "WorkItem") -> tuple[int, int, str, int]:
    mutation = item.mutations[0]
    return (*mutation.start_pos, mutation.operator_name, mutation.occurrence)


def run_mutants(
    tree: Path,
    session: Path,
    lines: dict[int, list[str]],
    durations: dict[str, float],
    *,
    limit: int | None = None,
) -> None:
    """Write each pending mutant to the tree, run the tests that reach its lines, record
    what they said (Cosmic Ray's own `mutate_and_test`: it puts the original back)."""
    import shlex

    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    os.environ.update(_env())
    os.chdir(tree)  # the session names the module relative to the tree
    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sorted(db.pending_work_items, key=_position)[:limit]
        for number, item in enumerate(pending, 1):
            mutation = item.mutations[0]
            tests = select_tests(lines, mutation.start_pos[0], mutation.end_pos[0], durations)
            started = time.monotonic()
            if tests:
                command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
                result = mutate_and_test(item.mutations, shlex.join(command + tests), TIMEOUT)
            else:
                result = WorkResult(
                    worker_outcome=WorkerOutcome.NORMAL,
                    test_outcome=TestOutcome.SURVIVED,
                    output="no test runs this line",
                )
            db.set_result(item.job_id, result)
            print(
                f"mutate: {mutation.module_path}:{mutation.start_pos[0]} "
                f"{mutation.operator_name} #{mutation.occurrence}: {result.test_outcome} "
                f"({len(tests)} tests, {time.monotonic() - started:.0f} s) "
                f"[{number}/{len(pending)}]",
                flush=True,
            )


# -- the score -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Survivor:
    module: str
    line: int
    operator: str
    source: str  # the original line, stripped
    change: str  # the mutated line, or why nothing ran

    def key(self) -> tuple[str, str, str]:
        return (self.module, self.operator, self.source)


@dataclass
class Score:
    module: str
    killed: int = 0
    survivors: tuple[Survivor, ...] = ()
    pending: int = 0
    not_tried: int = 0

    @property
    def tried(self) -> int:
        return self.killed + len(self.survivors)

    @property
    def ratio(self) -> float:
        return self.killed / self.tried if self.tried else 0.0


def equivalents(path: Path = EQUIVALENT) -> dict[tuple[str, str, str], str]:
    """The survivors explained as equivalent (no test could tell them from the original):
    `module | operator | original line | why`, one per line."""
    explained = {}
    for raw in path.read_text().splitlines() if path.exists() else ():
        if raw.strip() and not raw.startswith("#"):
            module, operator, source, why = (part.strip() for part in raw.split(" | ", 3))
            explained[(module, operator, source)] = why
    return explained


def score(tree: Path, session: Path, module: str) -> Score:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    source_lines = (tree / module).read_text().splitlines()
    result = Score(module)
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        result.pending = sum(1 for _ in db.pending_work_items)
        for item, outcome in db.completed_work_items:
            mutation = item.mutations[0]
            if outcome.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
                result.not_tried += 1
            elif outcome.test_outcome == TestOutcome.SURVIVED:
                line = mutation.start_pos[0]
                added = [
                    row[1:].strip()
                    for row in (outcome.diff or "").splitlines()
                    if row.startswith("+") and not row.startswith("+++")
                ]
                change = added[0] if added else (outcome.output or "")
                survivors.append(
                    Survivor(
                        module, line, mutation.operator_name, source_lines[line - 1].strip(), change
                    )
                )
            elif outcome.test_outcome == TestOutcome.KILLED:
                result.killed += 1
            else:  # Cosmic Ray could not apply it: neither caught nor missed
                result.not_tried += 1
    result.survivors = tuple(sorted(survivors, key=lambda s: (s.line, s.operator)))
    return result


def report(scores: list[Score], explained: dict[tuple[str, str, str], str]) -> tuple[str, bool]:
    """The table (and every survivor no line of equivalent.txt explains); whether every
    module met the goal with nothing unexplained."""
    rows = ["| module | mutants tried | killed | score | survivors explained as equivalent |"]
    rows.append("|---|---:|---:|---:|---:|")
    unexplained = []
    good = True
    for s in scores:
        known = [v for v in s.survivors if v.key() in explained]
        unexplained += [v for v in s.survivors if v.key() not in explained]
        rows.append(
            f"| `{s.module}` | {s.tried} | {s.killed} | {s.ratio:.0%} | {len(known)} |"
            + (f" ({s.pending} pending)" if s.pending else "")
        )
        good = good and s.pending == 0 and s.tried > 0 and s.ratio >= GOAL
    good = good and not unexplained
    lines = rows + (["", "Survivors not explained:"] if unexplained else [])
    lines += [
        f"- {v.module}:{v.line} {v.operator}: `{v.source}` -> `{v.change}`" for v in unexplained
    ]
    return "\n".join(lines), good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.mutate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all {len(MODULES)}")
    parser.add_argument(
        "--tests", nargs="+", default=["tests"], help="the tests the map is built from"
    )
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--limit", type=int, help="try at most this many mutants per module")
    parser.add_argument("--report", action="store_true", help="print the last scores; run nothing")
    parser.add_argument(
        "--equivalent", type=Path, default=EQUIVALENT, help="the survivors explained as equivalent"
    )
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if not (REPO / m).is_file()]
    if unknown:
        parser.error(f"no such module: {', '.join(unknown)}")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.report:
        tree = workdir / "tree"
        sessions = [(m, workdir / f"{_slug(m)}.sqlite") for m in modules]
        scores = [score(tree, s, m) for m, s in sessions if s.exists()]
    else:
        tree = prepare(workdir)
        lines = load_map(workdir)
        if lines is None or any(m not in lines for m in modules):
            # one map for every listed module: the next module's run needs no new one
            lines = build_map(tree, workdir, args.tests, sorted({*modules, *MODULES}))
        scores = []
        for module in modules:
            session = session_for(tree, workdir, module)
            run_mutants(tree, session, lines[module], load_durations(workdir), limit=args.limit)
            scores.append(score(tree, session, module))
    table, good = report(scores, equivalents(args.equivalent))
    print(table)
    return 0 if good else 1
