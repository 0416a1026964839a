"""A real PostgreSQL server for the tests: Debian's `postgresql` server binaries (`initdb`,
`pg_ctl` under /usr/lib/postgresql/<version>/bin; `hack/controlplane.py tools` installs the
package), a private data folder, loopback on a free port, password authentication (the
router gets a DSN with a password from a Secret, so the tests use one too).

PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user
the package creates (through `runuser`); as anyone else, as that user.

`start_postgres()` returns a `PostgresServer`; the session fixture `postgres` starts one for
the whole session and stops it at the end, and `server.create_database()` gives each test
an empty database of its own.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "kubetrain"
PASSWORD = "kubetrain-test-secret"
SYSTEM_USER = "postgres"  # created by Debian's postgresql-common
START_TIMEOUT_S = 60
SERVER_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresError(RuntimeError):
    pass


def server_bin_dir() -> Path:
    """The newest installed server's bin folder (the one with initdb and pg_ctl)."""
    found = [
        Path(d)
        for d in Path("/").glob(SERVER_BIN_GLOB.lstrip("/"))
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()
    ]
    if not found:
        raise PostgresError(
            f"no PostgreSQL server binaries ({SERVER_BIN_GLOB}/initdb): install Debian's "
            "`postgresql` package (`python3 hack/controlplane.py tools` does, as `make test`)"
        )

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", path.parent.name))

    return max(found, key=version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as when we are root (root may not run PostgreSQL)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(
            f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as "
            "(Debian's postgresql-common creates it)"
        ) from None


def _as_server_user(argv: list[str]) -> list[str]:
    return argv if _server_user() is None else ["runuser", "-u", SYSTEM_USER, "--", *argv]


def _run(argv: list[str], *, what: str) -> str:
    proc = subprocess.run(
        _as_server_user(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise PostgresError(f"{what} failed ({' '.join(argv)}):\n{proc.stdout[-3000:]}")
    return proc.stdout


@dataclass
class PostgresServer:
    """A running PostgreSQL on 127.0.0.1:port; data and socket under `base_dir`."""

    bin_dir: Path
    base_dir: Path
    port: int
    user: str = USER
    password: str = PASSWORD
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def pg_ctl(self) -> str:
        return str(self.bin_dir / "pg_ctl")

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URI, as a Secret would hold it."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """An empty database (a fresh unique name by default); returns its DSN."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        # CREATE DATABASE cannot run inside a transaction block.
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        """Stop the server at once (a test server's data is thrown away) and remove it."""
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                _as_server_user(
                    [self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(self.base_dir, ignore_errors=True)


def start_postgres(*, host: str = "127.0.0.1", attempts: int = 3) -> PostgresServer:
    """initdb a private cluster and start it on a free port of `host` (loopback; a real
    node's bridge address for pods); wait until it takes connections (`pg_ctl -w`). A
    port taken between choosing and binding is retried."""
    bin_dir = server_bin_dir()
    base_dir = Path(tempfile.mkdtemp(prefix="kubetrain-pg-"))  # mode 0700
    server = PostgresServer(bin_dir, base_dir, port=0, host=host)
    try:
        pwfile = base_dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        entry = _server_user()
        if entry is not None:
            for path in (base_dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",  # no dependency on the machine's generated locales
                "--no-sync",  # test data: nothing to keep across a power loss
            ],
            what="initdb",
        )
        if host != "127.0.0.1":  # pods connect from their own addresses, with the password
            with (server.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
        for attempt in range(attempts):
            server.port = _free_port()
            options = " ".join(
                [
                    f"-p {server.port}",
                    f"-c listen_addresses={host}",
                    f"-k {base_dir}",  # the unix socket in the private folder, not /run
                    # Durability of test data is not under test: skip the fsyncs.
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                ]
            )
            start = [server.pg_ctl, "-D", str(server.data_dir), "-l", str(server.log_path)]
            try:
                _run(
                    [*start, "-o", options, "-t", str(START_TIMEOUT_S), "-w", "start"],
                    what="pg_ctl start",
                )
                return server
            except PostgresError as exc:
                log = (
                    server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
                )
                if "could not bind" not in log or attempt == attempts - 1:
                    raise PostgresError(f"{exc}\nserver log:\n{log[-3000:]}") from None
                server.log_path.unlink()
        raise PostgresError(f"no free port after {attempts} attempts")
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the session; stopped at its end."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
