"""Test settings: the real settings, on PostgreSQL unless DATABASE_URL says otherwise.

Worker subprocesses load shop.settings with DATABASE_URL pointing at the test database,
so the code under test and the workers run on exactly the same configuration.
"""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop")

from shop.settings import *  # noqa: F403
