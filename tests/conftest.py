"""Session fixtures shared across test modules, registered once so that session scope means once.

`bundle_fixtures` (tiny random bases and plain-peft adapters) and `training_fixtures` (adapters trained
on the embedded base) are plugins: every module sees their fixtures without importing them, and each
session fixture is built once per run. `pg_server` starts one throwaway PostgreSQL per session for the
tests that run the registry and the tenant store on both database backends.

Two rules hold for every test, each a plugin of its own (`tests/test_suite_rules.py` proves them):
- `thread_failures`: a failure inside a thread fails the test that started it;
- `isolation`: no test sees another's `ADAPTERHUB_*` variables, `HOME` or torch thread count.
"""

from __future__ import annotations

import os

from hypothesis import settings

pytest_plugins = [
    "thread_failures", "isolation", "bundle_fixtures", "training_fixtures", "redis_server", "pg_server"
]


# Under CI the property tests draw the same examples on every run, so a red CI is reproducible and a
# green one is not luck; elsewhere they explore new examples each run (and fail where CI would not yet).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
