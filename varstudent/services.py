"""External services (a tracking server, a database) are checked before any work, with bounded retries.

A stage must not train for an hour and then fail on a dead tracking server, and a dead server must not
hang a run in a library's own retry loop (MLflow retries a database for ~an hour and HTTP 7 times with
exponential backoff by default). `check_service` tries to connect `retries + 1` times, each attempt
bounded by `timeout_s`, and fails with one line naming the URI (password hidden).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from varstudent.errors import ServiceError

log = logging.getLogger("varstudent")

DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}
DATABASES = ("postgresql", "mysql")


def redact(uri: str) -> str:
    """The URI with its password replaced by ***, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (PATH absolute after a fourth slash), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def _connect_database(uri: str, timeout_s: float) -> None:
    """One real database login (not just TCP): wrong credentials or a missing database fail here too."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, round(timeout_s))},
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _connect_tcp(host: str, port: int, timeout_s: float) -> None:
    with socket.create_connection((host, port), timeout=timeout_s):
        pass


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_service(uri: str, what: str, retries: int, timeout_s: float, backoff_s: float = 0.5) -> None:
    """Raise ServiceError unless the server behind `uri` answers within retries + 1 bounded attempts.

    Local stores (sqlite, file paths) have nothing to reach and pass.
    """
    scheme = _scheme(uri)
    if scheme not in DEFAULT_PORTS:
        return
    parts = urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or DEFAULT_PORTS[scheme]
    started, last = time.monotonic(), ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            if scheme in DATABASES:
                _connect_database(uri, timeout_s)
            else:
                _connect_tcp(host, port, timeout_s)
            return
        except ImportError as exc:  # a driver the URI names is not installed: no retry helps
            raise ServiceError(f"{what} {redact(uri)} needs a database driver that is not installed "
                               f"({exc.name or exc}); install varstudent[postgres]") from None
        except Exception as exc:  # socket errors, sqlalchemy/driver errors: the message is what matters
            last = _reason(exc)
            log.warning("%s %s: attempt %d/%d failed: %s", what, redact(uri), attempt + 1, retries + 1, last)
    raise ServiceError(f"{what} {redact(uri)} is unreachable after {retries + 1} attempts in "
                       f"{time.monotonic() - started:.0f} s ({last}); start it, fix the URI, or raise "
                       "services.retries / services.timeout_s")


def bound_mlflow_http(retries: int, timeout_s: float) -> None:
    """Bound MLflow's own HTTP retries and timeouts for the rest of the run (an explicit env var wins)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
