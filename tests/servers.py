"""Servers for the tests and benchmarks: free ports, a gateway's liveness, and a private
PostgreSQL server (initdb in a temporary folder, started on a free loopback port, thrown
away afterwards)."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _postgres_binary(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def local_postgres_available() -> bool:
    return bool(_postgres_binary("initdb") and _postgres_binary("pg_ctl"))


@dataclass
class PostgresServer:
    port: int
    admin_url: str

    def create_database(self, template: str | None = None) -> str:
        import psycopg

        name = f"registry_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(base_url: str) -> bool:
    """Whether a gateway at `base_url` says it is alive."""
    import httpx

    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def local_postgres(max_connections: int = 100) -> Iterator[PostgresServer]:
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    # PostgreSQL refuses to run as root: run it as the `postgres` user, in a folder it owns.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="confprobe-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(
        [*as_postgres, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    subprocess.run(
        [*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield PostgresServer(port=port, admin_url=f"postgresql://postgres@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
