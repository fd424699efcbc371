"""`make chaos` refuses nonsense before starting anything."""

import subprocess
import sys

import pytest

from tests.processes import REPO


@pytest.mark.parametrize("args", [["--orders", "0"], ["--declined-share", "2"], ["--nope"]])
def test_chaos_usage_errors_start_nothing(args):
    result = subprocess.run(
        [sys.executable, "deploy/chaos.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "usage: chaos.py" in result.stderr
    assert "lab in" not in result.stdout
