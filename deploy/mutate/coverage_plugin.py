"""Pytest plugin of `make mutate`'s map: which test runs which line of the mutated modules.

Loaded with `-p deploy.mutate.coverage_plugin` (never by `make test`). The test process is
measured with each test's node id as coverage's context. Every process a test starts (the
workers, the web, the start scripts) is measured too, through coverage's own start-up hook
(`COVERAGE_PROCESS_START`, put into the environment each process is started with, even a
copy a session fixture took before any test ran), with the *test file* as its context: a
module-scoped worker serves every test of its file. Inside a worker, a task the test
process published carries the test's node id in a header, and the lines the task runs
are credited to that test (coverage's static|dynamic context).
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import coverage
import pytest
from celery.signals import before_task_publish

from deploy.mutate import SUBPROCESS_PREFIX

OUT = Path(os.environ.get("MUTATE_COVERAGE_DIR", "var/mutate/coverage")).resolve()
# Only the modules being mutated are measured (the rest would only slow the run down).
MODULES = [str(Path(name).resolve()) for name in os.environ.get("MUTATE_MODULES", "").split(",")]
HEADER = "mutate_test"

# What each measured process loads at its start (a coverage plug-in module: coverage
# imports it wherever it measures, prefork children included): it credits the lines a
# task runs to the test named in the task's header.
_TASK_CONTEXTS = f'''
import coverage


def _enter(task=None, **_):
    cov = coverage.Coverage.current()
    test = getattr(getattr(task, "request", None), "{HEADER}", None)
    if cov is not None and test:
        cov.switch_context(test)


def _leave(**_):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context("")


def coverage_init(reg, options):
    try:
        from celery.signals import task_postrun, task_prerun
    except ImportError:
        return
    task_prerun.connect(_enter, weak=False, dispatch_uid="mutate-enter")
    task_postrun.connect(_leave, weak=False, dispatch_uid="mutate-leave")
'''
PYTHONPATH = OUT / "pythonpath"

# Started on import (`-p` imports plugins before the conftest files), so the lines the
# modules run on import are measured too (with the empty context).
OUT.mkdir(parents=True, exist_ok=True)
PYTHONPATH.mkdir(exist_ok=True)
(PYTHONPATH / "mutate_task_contexts.py").write_text(_TASK_CONTEXTS)
_coverage = coverage.Coverage(
    data_file=str(OUT / ".coverage"), data_suffix=True, include=MODULES, config_file=False
)
_coverage.start()
_current = {"test": "", "rc": ""}


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
            "plugins = mutate_task_contexts\n"
        )
    return rc


def _measured(env: dict[str, str]) -> dict[str, str]:
    env = {**env, "COVERAGE_PROCESS_START": _current["rc"]}
    env.pop("COVERAGE_PROCESS_CONFIG", None)
    ours = str(PYTHONPATH)
    paths = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path and path != ours]
    env["PYTHONPATH"] = os.pathsep.join([ours, *paths])
    return env


_popen_init = subprocess.Popen.__init__


def _popen_measured(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    """Every process a test starts is measured as the current test file's, whatever
    environment it is given."""
    if _current["rc"] and kwargs.get("env") is not None:
        kwargs["env"] = _measured(kwargs["env"])
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _popen_measured  # type: ignore[method-assign]


@before_task_publish.connect(weak=False)
def _name_the_test(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None and _current["test"]:
        headers[HEADER] = _current["test"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    _coverage.switch_context(item.nodeid)
    _current["test"] = item.nodeid
    _current["rc"] = str(_rc_for(item.nodeid.split("::", 1)[0]))
    os.environ.update(_measured(dict(os.environ)))


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """How long each test takes, set up and torn down: a mutant's tests run fastest first."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_unconfigure() -> None:
    _coverage.stop()
    _coverage.save()
    (OUT / "durations.json").write_text(json.dumps(_durations))
