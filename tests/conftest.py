"""Session fixtures shared across test modules, registered once so that session scope means once.

`bundle_fixtures` (tiny random bases and plain-peft adapters) and `training_fixtures` (adapters trained
on the embedded base) are plugins: every module sees their fixtures without importing them, and each
session fixture is built once per run. `pg_server` starts one throwaway PostgreSQL per session for the
tests that run the registry and the tenant store on both database backends.
"""

pytest_plugins = ["bundle_fixtures", "training_fixtures", "redis_server", "pg_server"]
