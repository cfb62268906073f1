"""A throwaway PostgreSQL server for the tests, started once per session (a pytest plugin).

`initdb` + `pg_ctl` from the installed PostgreSQL (any major version: `$ADAPTERHUB_PG_BIN`, else
`pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`) in a temp folder, on a free loopback
port, its unix socket in that folder too: no test depends on a server someone left running. As root (CI, this
machine) the server runs as the `postgres` user, since PostgreSQL refuses to run as root.
`fsync=off`: the tests kill clients, never the server's machine, so durability on disk is not what
they prove. Each test gets a fresh database (`new_database`).

Without PostgreSQL binaries the PostgreSQL cases are skipped locally, naming what is missing, and fail in
CI (`$CI` set).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import missing


def find_pg_bin(debian_root: Path = Path("/usr/lib/postgresql")) -> Path | None:
    """The folder holding `initdb` and `pg_ctl`, whatever PostgreSQL major version is installed."""
    if os.environ.get("ADAPTERHUB_PG_BIN"):
        return Path(os.environ["ADAPTERHUB_PG_BIN"])
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(debian_root.glob("*/bin"), key=lambda p: _major(p.parent.name))
    candidates += reversed(versions)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


PG_BIN = find_pg_bin()
USER = "adapterhub"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running cluster; `url(db)` gives a SQLAlchemy/psycopg URL on loopback TCP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._counter = itertools.count()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A fresh cluster in a temp folder, stopped and removed on the way out (whatever happened)."""
    if PG_BIN is None:
        missing(
            "PostgreSQL's initdb/pg_ctl not found (not in $ADAPTERHUB_PG_BIN, `pg_config --bindir`, "
            "/usr/lib/postgresql/*/bin or PATH): apt-get install -y postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="adapterhub-pg-"))
    server = PostgresServer(root)
    try:
        server.init()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's server: tests share it, so no test may stop it (they take `own_postgres`)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, for tests that stop it (an outage) without touching the others'."""
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def backend(request) -> str:
    """The database backend a test runs against (every store test runs on both; the PostgreSQL runs
    are `slow`: they start a server, so the contributors' fast loop runs the SQLite ones)."""
    return request.param


@pytest.fixture
def db_location(request, backend: str, tmp_path: Path) -> str:
    """A location for a fresh store: a SQLite file path, or a new PostgreSQL database's URL."""
    if backend == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres").new_database()
