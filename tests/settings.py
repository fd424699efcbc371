"""Test settings: the real settings, on PostgreSQL unless DATABASE_URL says otherwise.

Worker subprocesses load shop.settings with DATABASE_URL pointing at the test database,
so the code under test and the workers run on exactly the same configuration.
"""

import os
import tempfile

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop")
# Metrics of the test process and its worker subprocesses, summed as on one host.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="metrics-"))
# A circuit breaker stays open 2 s (not 30), then lets the whole rate through at once
# (no ramp), unless a test asks otherwise; the workers inherit this environment.
os.environ.setdefault("BREAKER_COOLDOWN", "2")
os.environ.setdefault("BREAKER_RAMP", "0")

from shop.settings import *  # noqa: F403

# A test database of this run's own: two suites at once (a developer's and CI's, two
# clones) must not drop each other's database.
DATABASES["default"]["TEST"] = {"NAME": f"test_shop_{os.getpid()}"}  # noqa: F405
