"""Pytest plugin of `make mutate`'s map: which test runs which line of the mutated modules.

Loaded with `-p deploy.mutate.coverage_plugin` (never by `make test`). The test process is
measured with each test's node id as coverage's context; every process a test starts (the
workers, the web, the start scripts) is measured too, through coverage's own start-up hook
(`COVERAGE_PROCESS_START`), with the *test file* as its context: a module-scoped worker
serves every test of its file, so its lines cannot be told apart by test.
"""

import json
import os
from pathlib import Path

import coverage
import pytest

from deploy.mutate import SUBPROCESS_PREFIX

OUT = Path(os.environ.get("MUTATE_COVERAGE_DIR", "var/mutate/coverage")).resolve()
# Only the modules being mutated are measured (the rest would only slow the run down).
MODULES = [str(Path(name).resolve()) for name in os.environ.get("MUTATE_MODULES", "").split(",")]

# Started on import (`-p` imports plugins before the conftest files), so the lines the
# modules run on import are measured too (with the empty context).
OUT.mkdir(parents=True, exist_ok=True)
_coverage = coverage.Coverage(
    data_file=str(OUT / ".coverage"), data_suffix=True, include=MODULES, config_file=False
)
_coverage.start()


def _rc_for(test_file: str) -> Path:
    """The configuration the processes started by `test_file`'s tests measure themselves
    with: written once per test file."""
    rc = OUT / "rc" / (test_file.replace("/", "__") + ".ini")
    if not rc.exists():
        rc.parent.mkdir(parents=True, exist_ok=True)
        rc.write_text(
            "[run]\n"
            f"data_file = {OUT / '.coverage'}\n"
            "parallel = true\n"
            "include =\n"
            + "".join(f"    {module}\n" for module in MODULES)
            + f"context = {SUBPROCESS_PREFIX}{test_file}\n"
            # prefork children are forked and leave through os._exit; workers stop on SIGTERM
            "patch = fork, _exit, subprocess\n"
            "sigterm = true\n"
        )
    return rc


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    _coverage.switch_context(item.nodeid)
    os.environ["COVERAGE_PROCESS_START"] = str(_rc_for(item.nodeid.split("::", 1)[0]))


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """How long each test takes, set up and torn down: a mutant's tests run fastest first."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_unconfigure() -> None:
    _coverage.stop()
    _coverage.save()
    (OUT / "durations.json").write_text(json.dumps(_durations))
