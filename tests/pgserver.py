"""A real PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries, a throwaway cluster.

``PostgresServer.start()`` runs ``initdb`` into a temporary directory and ``pg_ctl start`` on a free loopback
port with trust authentication; ``url(dbname)`` gives a ``postgresql://`` URL, ``create_database``
and ``create_schema`` give each test its own namespace. As root the cluster belongs to the
``postgres`` system user (PostgreSQL refuses to run as root). ``unavailable()`` says why no server
can be started here, or None.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[-3]))
    return Path(versions[-1]).parent if versions else None


def unavailable() -> str | None:
    """Why a PostgreSQL server cannot be started here (None: it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'hivefold[postgresql]')"
    if _bindir() is None:
        return "PostgreSQL's server binaries are not installed (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, root: Path, port: int, bindir: Path, user: str | None):
        self.root, self.port, self.bindir, self.user = root, port, bindir, user

    @classmethod
    def start(cls, *, durable: bool = False) -> PostgresServer:
        """A new cluster in a temporary directory of its own (under /tmp, which the ``postgres`` user can
        reach; ``stop`` removes it). ``durable=False`` turns fsync off too (tests; a crash may corrupt it)."""
        why = unavailable()
        if why:
            raise RuntimeError(why)
        user = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="hivefold-pg-"))
        if user:
            pw = pwd.getpwnam(user)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = cls(root, _free_port(), _bindir(), user)
        server._run("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync")
        # durable: SQLite's WAL with synchronous=NORMAL (what the ledger uses) survives a crash of the process
        # but may lose the last commits in a power cut; synchronous_commit=off promises the same
        options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c max_connections=200 "
                   "-c synchronous_commit=off")
        if not durable:
            options += " -c fsync=off -c full_page_writes=off"
        server._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(root / "data"), "-l", str(root / "server.log"),
                    "-o", options)
        return server

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, user=self.user, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def url(self, dbname: str = "postgres", *, schema: str | None = None) -> str:
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"
        return f"{url}?options=-csearch_path%3D{schema}" if schema else url

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self, name: str, dbname: str = "postgres") -> str:
        self.sql(f'CREATE SCHEMA "{name}"', dbname)
        return self.url(dbname, schema=name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.root / "data"))
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def postmaster_pids(self) -> list[int]:
        """The server's main process (its backends are its children), for CPU accounting."""
        pidfile = self.root / "data" / "postmaster.pid"
        return [int(pidfile.read_text().split()[0])] if pidfile.exists() else []
