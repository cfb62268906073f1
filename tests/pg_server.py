"""A throwaway PostgreSQL server for the tests, started once per session (a pytest plugin).

`initdb` + `pg_ctl` from Debian's PostgreSQL 15 in a temp folder, on a free loopback port, its unix
socket in that folder too: no test depends on a server someone left running. As root (CI, this
machine) the server runs as the `postgres` user, since PostgreSQL refuses to run as root.
`fsync=off`: the tests kill clients, never the server's machine, so durability on disk is not what
they prove. Each test gets a fresh database (`new_database`).

Without PostgreSQL binaries the PostgreSQL cases are skipped locally and fail in CI (`$CI` set).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("ADAPTERHUB_PG_BIN", "/usr/lib/postgresql/15/bin"))
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if not (PG_BIN / "initdb").exists():
        msg = f"PostgreSQL binaries not found in {PG_BIN} (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="adapterhub-pg-"))
    server = PostgresServer(root)
    try:
        server.init()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


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
