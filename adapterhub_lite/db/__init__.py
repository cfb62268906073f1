"""State in a database: the registry index and the tenant store on SQLite (default) or PostgreSQL.

`Database` opens either from a location string through SQLAlchemy Core; `migrate` keeps the schema
version; `ChangeFeed` tells a reader cheaply that another process committed a change.
"""

from adapterhub_lite.db.changes import ChangeFeed
from adapterhub_lite.db.engine import SUPPORTED, Database, is_url, redact, sqlite_path
from adapterhub_lite.db.schema import meta_table, migrate

__all__ = ["SUPPORTED", "ChangeFeed", "Database", "is_url", "meta_table", "migrate", "redact", "sqlite_path"]
