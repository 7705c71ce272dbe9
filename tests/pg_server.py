"""A throwaway PostgreSQL server on 127.0.0.1 for tests: initdb into a temp dir, start on a free port,
yield a URL, stop and delete. Skips (with how to enable) when the server binaries are missing.

    with postgres_server() as url:   # postgresql://postgres@127.0.0.1:PORT/postgres
        ...
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HOW_TO_ENABLE = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them (Debian/Ubuntu: "
                 "apt-get install postgresql) or put their folder on PATH to run this test")


def server_binary(name: str) -> str | None:
    """On PATH, or in Debian's versioned folder (/usr/lib/postgresql/<version>/bin), newest first."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    initdb, pg_ctl = server_binary("initdb"), server_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(HOW_TO_ENABLE)
    base = Path(tempfile.mkdtemp(prefix="vs-pg-"))  # short path: the socket name must fit 107 bytes
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as `nobody`
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and `runuser` is missing: PostgreSQL cannot start as root")
        shutil.chown(base, "nobody")
        as_user = [runuser, "-u", "nobody", "--"]
    data = base / "data"
    port = free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        options = f"-h 127.0.0.1 -p {port} -k {base} -F -c max_connections=100"
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-o", options,
                        "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (base / "server.log").read_text() if (base / "server.log").is_file() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {exc}\n{getattr(exc, 'stderr', '')}\n{log[-2000:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
