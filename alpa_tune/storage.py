"""Storage URL -> Optuna storage: embedded SQLite (default), PostgreSQL, or a journal file.

Also the short critical sections the workers need (schema creation, count-and-ask) and
password masking: a URL or error text leaves this module only with its password replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from alpa_tune.config import WorkersConfig

# Our own output says what happened; Optuna's info logs and experimental-API warnings are noise to users.
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

ENV_VAR = "ALPA_TUNE_STORAGE"
DEFAULT_URL = "sqlite:///alpa-tune.db"
SCHEMES = ("sqlite", "postgresql", "journal")
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)", re.I)


class StorageError(ValueError):
    """The storage URL is malformed, unreachable or refused us; the message is masked."""


def resolve_url(url: str | None) -> str:
    """``--storage`` wins, then ``$ALPA_TUNE_STORAGE``, then the embedded default."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", url)


def mask_text(text: str, url: str | None = None) -> str:
    """Remove any password (from ``url`` or any URL inside ``text``) from a message."""
    text = _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", text)
    password = urlsplit(url).password if url and "://" in url else None
    if password:
        text = text.replace(password, "***")
    return text


def scheme_of(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""
    if scheme not in SCHEMES:
        raise StorageError(
            f"storage URL {mask_url(url)!r}: unknown scheme {scheme or '(none)'!r}; use sqlite:///FILE, "
            "postgresql://USER@HOST/DB (password in the URL or ~/.pgpass) or journal:FILE"
        )
    return scheme


def driver_url(url: str) -> str:
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; we ship psycopg2, so name it."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, workers: WorkersConfig | None = None) -> BaseStorage:
    """Open (creating the schema once if needed) the Optuna storage behind ``url``.

    With ``workers`` the storage runs heartbeats and re-queues the trials of dead workers
    (``RetryHeartbeatStaleTrialCallback``); read-only commands pass None.
    """
    scheme = scheme_of(url)
    if scheme == "journal":
        return _open_journal(url)
    heartbeat: dict[str, Any] = {}
    if workers is not None:
        heartbeat = {
            "heartbeat_interval": workers.heartbeat_interval,
            "grace_period": workers.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries),
        }
    try:
        if scheme == "sqlite":
            _prepare_sqlite(url)
            # A long busy timeout: local workers share one file and queue for its write lock.
            return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **heartbeat)
        engine_kwargs = {
            "pool_pre_ping": True,  # a connection killed by the server is replaced, not used
            "pool_size": 2,
            "max_overflow": 2,
            "pool_recycle": 600,
            "connect_args": _PG_CONNECT_ARGS,
        }
        for attempt in range(_TRANSIENT_RETRIES + 1):
            try:
                # Optuna's table creation races when many processes meet an empty database.
                with _postgres_lock(url, "alpa-tune:schema"):
                    return RDBStorage(driver_url(url), engine_kwargs=engine_kwargs, **heartbeat)
            except Exception as exc:  # noqa: BLE001
                # A worker starting while the server restarts or drops sessions waits a little;
                # a wrong password or a missing database fails at once.
                if attempt == _TRANSIENT_RETRIES or not _is_transient(exc):
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - drivers raise many types; all become one masked line
        raise StorageError(f"cannot open storage {mask_url(url)}: {_reason(exc, url)}") from None


# TCP keepalives: a connection whose server or network vanished errors out within about a
# minute instead of blocking a worker (or the study lock) forever.
_PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                    "keepalives_interval": 10, "keepalives_count": 3}
_TRANSIENT_RETRIES = 4
_TRANSIENT_MARKERS = ("server closed the connection", "terminating connection", "connection already closed",
                      "could not receive data", "the database system is starting up",
                      "the database system is shutting down", "SSL SYSCALL error")


def _is_transient(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", None) or exc)
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def _reason(exc: BaseException, url: str) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    # psycopg2 puts the useful part ("password authentication failed", "does not exist") last.
    text = next((line for line in reversed(lines) if "FATAL" in line or "error" in line.lower()), lines[-1] if lines else type(exc).__name__)
    return mask_text(text, url)


def _prepare_sqlite(url: str) -> None:
    path = sqlite_path(url)
    if path is None:
        return
    if not path.parent.is_dir():
        raise StorageError(f"storage {url}: folder {path.parent} does not exist")
    # WAL lets the dashboard and readers work while a worker writes; it is a property of the file.
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def sqlite_path(url: str) -> Path | None:
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    return None if rest in ("", ":memory:") else Path(rest)


def _journal_path(url: str) -> Path:
    rest = url.split(":", 1)[1]
    return Path(rest[2:] if rest.startswith("//") else rest)


def _open_journal(url: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = _journal_path(url)
    if not str(path) or not path.parent.is_dir():
        raise StorageError(f"storage {url}: folder {path.parent} does not exist")
    return JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def study_lock(url: str, study_name: str) -> Iterator[Any]:
    """Cross-process critical section for one study (count-and-ask, seeding).

    PostgreSQL: a session advisory lock (works across machines, released by the server if
    the holder dies); yields the locked connection, which may run queries of its own.
    SQLite and journal files: an flock beside the file (one host); yields None.
    """
    scheme = scheme_of(url)
    if scheme == "postgresql":
        with _postgres_lock(url, f"alpa-tune:study:{study_name}") as connection:
            yield connection
        return
    path = sqlite_path(url) if scheme == "sqlite" else _journal_path(url)
    if path is None:  # in-memory SQLite: one process, nothing to guard
        yield None
        return
    # Not "{path}.lock": Optuna's journal backend uses that name for its own lock.
    with open(f"{path}.alpa-tune-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# One autocommit connection per URL, kept for the process's life: taking the lock then costs
# two round trips (lock, unlock) instead of a pool checkout, a ping and a reset as well.
_lock_connections: dict[str, Any] = {}


@contextlib.contextmanager
def _postgres_lock(url: str, name: str) -> Iterator[Any]:
    import sqlalchemy

    key = zlib.crc32(name.encode()) - 2**31  # a stable signed 32-bit key
    connection = _lock_connections.get(url)
    if connection is None or connection.closed or connection.invalidated:
        engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool,
                                          connect_args=_PG_CONNECT_ARGS)
        connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        _lock_connections[url] = connection
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except sqlalchemy.exc.DBAPIError:
        _drop_lock_connection(url)  # killed by the server or the network: reconnect next time
        raise
    try:
        yield connection
    finally:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        except sqlalchemy.exc.DBAPIError:
            _drop_lock_connection(url)  # a dead session's locks are already released


def _drop_lock_connection(url: str) -> None:
    connection = _lock_connections.pop(url, None)
    if connection is not None:
        with contextlib.suppress(Exception):
            connection.invalidate()
            connection.close()


def count_trial_states(storage: BaseStorage, study_id: int, connection: Any = None) -> dict[TrialState, int]:
    """Trials per state. On an RDB one GROUP BY query, not a load of every trial (it runs per
    trial); ``connection`` (the study lock's) saves a pool checkout."""
    counts = {state: 0 for state in TrialState}
    if isinstance(storage, RDBStorage):
        import sqlalchemy

        query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state")
        with contextlib.ExitStack() as stack:
            if connection is None:
                connection = stack.enter_context(storage.engine.connect())
            for state, count in connection.execute(query, {"study": study_id}):
                counts[TrialState[state]] = count
        return counts
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        counts[trial.state] += 1
    return counts
