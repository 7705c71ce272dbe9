"""A throwaway PostgreSQL server for tests: initdb into a temp dir, listen on 127.0.0.1 only, stop and delete.

Used through the `postgres_url` fixture (tests/conftest.py): one server per session, a fresh database per
test. Needs the PostgreSQL server binaries (`initdb`, `pg_ctl`; Debian/Ubuntu: `apt-get install postgresql`,
which `.ci/run` does) and the `psycopg` driver (`pip install -e '.[postgres]'`); without them the tests that
use it are skipped with that hint. PostgreSQL refuses to run as root: as root, the cluster is owned and run by
the `postgres` (or `nobody`) user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HINT = ("install the PostgreSQL server binaries to run it (Debian/Ubuntu: apt-get install postgresql; "
        "initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin) and psycopg (pip install -e '.[postgres]')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binaries() -> tuple[str, str] | None:
    """(initdb, pg_ctl), from PATH or the Debian layout; None when not installed."""
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb, pg_ctl = shutil.which("initdb", path=folder), shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def missing() -> str | None:
    """Why a PostgreSQL test cannot run here, or None."""
    if find_binaries() is None:
        return "PostgreSQL server binaries not found"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed"
    return None


def _run_as() -> dict[str, int]:
    """subprocess arguments that drop root (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return {"user": entry.pw_uid, "group": entry.pw_gid}
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists")


@contextmanager
def postgres_server(timeout: float = 60) -> Iterator[str]:
    """Start a cluster on 127.0.0.1 at a free port; yield a SQLAlchemy URL (postgresql+psycopg://)."""
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError(f"no PostgreSQL binaries: {HINT}")
    initdb, pg_ctl = binaries
    owner = _run_as()
    root = Path(tempfile.mkdtemp(prefix="varstudent-pg-"))
    root.chmod(0o755)
    data, sockets, port = root / "data", root / "sock", free_port()
    sockets.mkdir()
    if owner:
        os.chown(root, owner["user"], owner["group"])
        os.chown(sockets, owner["user"], owner["group"])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    started = False
    try:
        subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=timeout, env=env, cwd=root, **owner)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets} -c fsync=off"
        subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t",
                        str(int(timeout)), "start"], check=True, capture_output=True, timeout=timeout + 10,
                       env=env, cwd=root, **owner)
        started = True
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _wait_ready(port, timeout)
        yield url
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text()[-2000:] if (root / "server.log").is_file() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout} {log}") from None
    finally:
        if started:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60, env=env, cwd=root, **owner)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=3):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create_database(server_url: str) -> str:
    """CREATE a new database on the server at `server_url`; its URL (same form)."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    port = int(server_url.rsplit(":", 1)[1].split("/")[0])
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"
