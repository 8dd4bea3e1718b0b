"""Storage URL -> Optuna storage: embedded SQLite (default), PostgreSQL, or a journal file.

Also the short critical sections the workers need (schema creation, count-and-ask) and
password masking: a URL or error text leaves this module only with its password replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from alpa_tune.config import WorkersConfig
from alpa_tune.errors import BadInput
from alpa_tune.units import DiskFull, format_bytes, free_space, is_disk_full

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

ENV_VAR = "ALPA_TUNE_STORAGE"
DEFAULT_URL = "sqlite:///alpa-tune.db"
SCHEMES = ("sqlite", "postgresql", "journal")
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)", re.I)


class StorageError(BadInput):
    """The storage URL is malformed, unreachable or refused us; the message is masked."""


def resolve_url(url: str | None) -> str:
    """``--storage`` wins, then ``$ALPA_TUNE_STORAGE``, then the embedded default."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def quiet_optuna() -> None:
    """Silence Optuna's info logs and experimental-API warnings: our own output says what happened.

    Called by the command line (and so by every worker it starts), not at import: a program that
    imports this module keeps its own logging and warning settings.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; a URL without a password unchanged."""
    try:
        parsed = _parse_url(url)
    except StorageError:
        return _mask_pattern(url)  # malformed: mask whatever looks like a password
    return url if parsed is None or parsed.password is None else parsed.render_as_string(hide_password=True)


def mask_text(text: str, url: str | None = None) -> str:
    """Remove any password (from ``url`` or any URL inside ``text``) from a message."""
    text = _mask_pattern(text)
    with contextlib.suppress(StorageError):
        parsed = _parse_url(url) if url else None
        if parsed is not None and parsed.password:
            text = text.replace(str(parsed.password), "***")  # decoded, as a driver may quote it
    return text


def _mask_pattern(text: str) -> str:
    """Free text: mask the password of anything shaped like ``scheme://user:password@``."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", text)


_URL_FORMS = "use sqlite:///FILE, postgresql://USER@HOST/DB (password in the URL or ~/.pgpass) or journal:FILE"


def _parse_url(url: str) -> URL | None:
    """The SQLAlchemy URL behind ``url``; None for a journal URL (``journal:FILE`` is not one)."""
    from sqlalchemy.engine import make_url

    if url[:8].lower() == "journal:":
        return None
    try:
        return make_url(url)
    except Exception as exc:  # noqa: BLE001 - ArgumentError, or ValueError for a port such as ":abc"
        detail = str(exc).splitlines()[0] if "://" in url else "no scheme://"
        raise StorageError(f"storage URL {_mask_pattern(url)!r}: malformed ({detail}); {_URL_FORMS}") from None


def scheme_of(url: str) -> str:
    """``sqlite``, ``postgresql`` or ``journal``; a StorageError (one masked line) for anything else."""
    parsed = _parse_url(url)
    scheme = "journal" if parsed is None else parsed.get_backend_name().lower()
    if scheme not in SCHEMES:
        raise StorageError(f"storage URL {mask_url(url)!r}: unknown scheme {scheme!r}; {_URL_FORMS}")
    return scheme


def driver_url(url: str) -> str:
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; we ship psycopg2, so name it."""
    if scheme_of(url) != "postgresql":
        return url
    return _parse_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def open_storage(url: str, workers: WorkersConfig | None = None, *, read_only: bool = False) -> BaseStorage:
    """Open (creating the schema once if needed) the Optuna storage behind ``url``.

    With ``workers`` the storage runs heartbeats and re-queues the trials of dead workers
    (``RetryHeartbeatStaleTrialCallback``). ``read_only`` (list, show, export, dashboard) refuses
    a SQLite or journal file that does not exist instead of creating an empty one.
    """
    scheme = scheme_of(url)
    if read_only:
        path = journal_or_sqlite_path(url)
        if path is not None and not path.is_file():
            raise StorageError(f"storage {mask_url(url)}: {path} does not exist (nothing to read; "
                               "check --storage or $ALPA_TUNE_STORAGE)")
    if scheme == "journal":
        return _open_journal(url, repair=not read_only)
    heartbeat: dict[str, Any] = {}
    if workers is not None:
        heartbeat = {
            "heartbeat_interval": workers.heartbeat_interval,
            "grace_period": workers.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries),
        }
    try:
        if scheme == "sqlite":
            # Optuna's table creation races when two processes meet a new file ("table
            # study_directions already exists"): one process at a time opens it.
            with _schema_lock(url, read_only):
                _prepare_sqlite(url)
                # A long busy timeout (local workers share one file and queue for its write lock),
                # unless the URL names its own (?timeout=S, which SQLAlchemy passes to sqlite3).
                busy = {} if "timeout" in _parse_url(url).query else {"connect_args": {"timeout": 60}}
                return RDBStorage(url, engine_kwargs=busy, **heartbeat)
        engine_kwargs = {
            "pool_pre_ping": True,  # a connection killed by the server is replaced, not used
            "pool_size": 2,
            "max_overflow": 2,
            "pool_recycle": 600,
            "connect_args": _pg_connect_args(url),
        }
        for attempt in range(_TRANSIENT_RETRIES + 1):
            try:
                # Optuna's table creation races when many processes meet an empty database.
                with _postgres_lock(url, "alpa-tune:schema"):
                    return RDBStorage(driver_url(url), engine_kwargs=engine_kwargs, **heartbeat)
            except Exception as exc:  # noqa: BLE001
                # A worker starting while the server restarts or drops sessions waits a little;
                # a wrong password or a missing database fails at once.
                if attempt == _TRANSIENT_RETRIES or not _is_transient(exc, url):
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - drivers raise many types; all become one masked line
        if is_disk_full(exc):
            raise disk_full_error(url) from None
        raise StorageError(f"cannot open storage {mask_url(url)}: {_reason(exc, url)}") from None


# A connection whose server or network vanished errors out within about a minute instead of
# blocking a worker (or the study lock) for ever: keepalives when idle, tcp_user_timeout while a
# reply is awaited (keepalives do not apply then; the kernel alone would wait ~15 minutes).
_PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                    "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 60_000}
# The same for the server's side of each session, which the settings above do not reach. A worker
# cut off (or hung) between a statement and its COMMIT leaves its session idle in a transaction
# that holds row locks (a parameter's INSERT locks its trial's row against the FOR UPDATE that
# fails the trial), and one cut off inside the study lock leaves the advisory lock held: either
# blocks every other worker until the server notices, which by default takes two hours.
IDLE_IN_TRANSACTION_TIMEOUT_S = 30  # our transactions last milliseconds; a wrong kill is one retry
_PG_SERVER_OPTIONS = " ".join(f"-c {name}={value}" for name, value in {
    "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_TIMEOUT_S}s",
    **{f"tcp_{key}": _PG_CONNECT_ARGS[key] for key in ("keepalives_idle", "keepalives_interval", "keepalives_count")},
    "tcp_user_timeout": _PG_CONNECT_ARGS["tcp_user_timeout"],  # the server's side mirrors the client's
}.items())


def _pg_connect_args(url: str) -> dict[str, Any]:
    """Connection arguments for a PostgreSQL URL; an ``options`` in the URL comes after ours (and wins)."""
    given = _parse_url(url).query.get("options")
    given = " ".join(given) if isinstance(given, tuple) else given
    return {**_PG_CONNECT_ARGS, "options": f"{_PG_SERVER_OPTIONS} {given}" if given else _PG_SERVER_OPTIONS}


_TRANSIENT_RETRIES = 4
# SQLSTATEs of a server that is restarting or dropped us (class 08: connection exceptions).
_TRANSIENT_SQLSTATES = ("57P01", "57P02", "57P03")  # admin_shutdown, crash_shutdown, cannot_connect_now


def _is_transient(exc: BaseException, url: str | None = None) -> bool:
    """Whether ``exc`` (or what it wraps) is a server restarting or a connection lost: worth a retry.

    A wrong password or a missing database is not.
    """
    import psycopg2
    import sqlalchemy

    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            if error.connection_invalidated:
                return True
            error = error.orig
            continue
        code = getattr(error, "pgcode", None)
        if code:
            return code.startswith("08") or code in _TRANSIENT_SQLSTATES
        if isinstance(error, psycopg2.OperationalError):
            # No SQLSTATE: a dropped socket, a server down, or a refused connect (psycopg2 gives
            # none for any failed connect). Only a refusal carries the server's own line, led by its
            # severity. Then ask the server (libpq's PQping): one accepting connections refused *us*
            # (a wrong password, a missing database); one starting up or shutting down is worth a wait.
            if "FATAL:" not in str(error):
                return True
            answer = _ping(url) if url else None
            return answer is not None and answer not in (_PQPING_OK, _PQPING_NO_ATTEMPT)
        error = error.__cause__ or error.__context__
    return False


_PQPING_OK, _PQPING_NO_ATTEMPT = 0, 3


def _ping(url: str) -> int | None:
    """libpq's PQping on ``url``: 0 accepting, 1 rejecting (starting or shutting down), 2 no
    response, 3 no attempt (bad parameters); None when libpq cannot be loaded."""
    import ctypes
    import ctypes.util
    import glob

    import psycopg2

    # psycopg2-binary ships its own libpq beside the module; else the system's.
    bundled = glob.glob(os.path.join(os.path.dirname(os.path.dirname(psycopg2.__file__)),
                                     "psycopg2_binary.libs", "libpq*.so*"))
    for candidate in [*bundled, ctypes.util.find_library("pq")]:
        if not candidate:
            continue
        try:
            libpq = ctypes.CDLL(candidate)
        except OSError:
            continue
        libpq.PQping.argtypes = [ctypes.c_char_p]
        libpq.PQping.restype = ctypes.c_int
        uri = _parse_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        separator = "&" if "?" in uri else "?"
        return int(libpq.PQping(f"{uri}{separator}connect_timeout=5".encode()))
    return None


def _reason(exc: BaseException, url: str) -> str:
    """The driver's own message, masked: under Optuna's and SQLAlchemy's wrappers ("invalid data
    in the commit, e.g. exceeding max length" says nothing about a server that went away)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    # psycopg2 puts the useful part ("password authentication failed", "does not exist") last.
    text = next((line for line in reversed(lines) if "FATAL" in line or "error" in line.lower()), lines[-1] if lines else type(exc).__name__)
    return mask_text(text, url)


def require_folder(url: str, path: Path) -> None:
    """A storage file's folder must exist: we create files, never folders."""
    if not path.parent.is_dir():
        raise StorageError(f"storage {mask_url(url)}: folder {path.parent} does not exist")


def _prepare_sqlite(url: str) -> None:
    path = sqlite_path(url)
    if path is None:
        return
    require_folder(url, path)
    # WAL lets the dashboard and readers work while a worker writes; it is a property of the file.
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, without its query (``?timeout=5``); None for in-memory SQLite."""
    database = _parse_url(url).database
    return None if database in (None, "", ":memory:") else Path(database)


def journal_or_sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite or journal URL; None for PostgreSQL and in-memory SQLite."""
    scheme = scheme_of(url)
    if scheme == "postgresql":
        return None
    return sqlite_path(url) if scheme == "sqlite" else _journal_path(url)


def _journal_path(url: str) -> Path:
    rest = url.split(":", 1)[1]
    return Path(rest[2:] if rest.startswith("//") else rest)


def _open_journal(url: str, repair: bool = True) -> BaseStorage:
    from optuna.storages.journal import JournalStorage

    path = _journal_path(url)
    require_folder(url, path)
    if path.is_dir():
        raise StorageError(f"storage {url}: {path} is a folder, not a journal file")
    try:
        backend = _SafeJournalBackend(str(path))
        if repair:
            backend.repair()
        else:
            _check_journal(path)
        return JournalStorage(backend)
    except StorageError:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(url) from None
        raise StorageError(f"storage {url}: {path}: {exc.strerror or exc}") from None


def _check_journal(path: Path) -> int:
    """Refuse a file that is not an Optuna journal; return the size of its complete records.

    Only the first record and the tail are read: a journal's records are whole JSON lines, and a
    crash or a full disk can only cut the last one short.
    """
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as handle:
        first = handle.readline()
        complete = first.endswith(b"\n")
        if complete and not _is_record(first):
            raise StorageError(f"storage journal:{path}: not an Optuna journal (its first line is not a "
                               "journal record); choose another file")
        # The last newline ends the last complete record; anything after it is a torn write.
        tail_start = max(0, size - (1 << 20))
        handle.seek(tail_start)
        tail = handle.read()
    end = tail.rfind(b"\n")
    if end < 0 and tail_start > 0:
        raise StorageError(f"storage journal:{path}: its last megabyte holds no complete record; "
                           "not a journal alpa-tune can repair")
    complete_size = tail_start + end + 1 if end >= 0 else 0
    if complete_size == 0 and not _looks_like_record_start(first):
        raise StorageError(f"storage journal:{path}: not an Optuna journal; choose another file")
    return complete_size


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _looks_like_record_start(data: bytes) -> bool:
    return data.startswith(b'{"op_code"')


class _SafeJournalBackend(BaseJournalBackend):
    """Optuna's journal file backend that never appends after a torn record.

    Optuna's ``append_logs`` writes a batch of lines with one ``write``; a crash or a full disk
    can leave the last line cut short, and the next append would glue a good record onto the
    fragment, after which every reader fails. Under the journal's own lock this backend first
    cuts any fragment off (keeping a copy beside the file) and, if its own write fails, truncates
    back to where it began.
    """

    def __init__(self, path: str) -> None:
        self._lock = JournalFileSymlinkLock(path)  # the lock Optuna's own backend takes by default
        self._inner = JournalFileBackend(path, lock_obj=self._lock)
        self._path = Path(path)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        return self._inner.read_logs(log_number_from)

    def repair(self) -> None:
        """Check the file is a journal and cut a torn last record off (under the journal lock)."""
        self._lock.acquire()
        try:
            _check_journal(self._path)
            self._cut_fragment()
        finally:
            self._lock.release()

    def _cut_fragment(self) -> int:
        """Remove bytes after the last complete record, keeping them beside the file; the size left.

        Cheap when the file is whole (one byte read), so it runs before every append.
        """
        fd = os.open(self._path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                return size
            complete = _check_journal(self._path)
            fragment = os.pread(fd, size - complete, complete)
            kept = self._path.with_name(f"{self._path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                kept.write_bytes(fragment)
            except OSError:
                kept.unlink(missing_ok=True)
                raise  # a full disk: leave the journal as it is; the next writer repairs it
            os.ftruncate(fd, complete)
            os.fsync(fd)
        finally:
            os.close(fd)
        print(f"alpa-tune: journal {self._path}: its last record was cut short ({size - complete} bytes; "
              f"a crash or a full disk): removed it, the cut-off bytes are kept in {kept.name}", file=sys.stderr)
        return complete

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        self._lock.acquire()
        try:
            start = self._cut_fragment()
            # Unbuffered: after a failed write no buffer is left to be flushed behind the truncate.
            fd = os.open(self._path, os.O_WRONLY)
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], start + written)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, start)  # no fragment left for the next writer to glue onto
                raise
            finally:
                os.close(fd)
        finally:
            self._lock.release()


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
    path = journal_or_sqlite_path(url)
    if path is None:  # in-memory SQLite: one process, nothing to guard
        yield None
        return
    # Not "{path}.lock": Optuna's journal backend uses that name for its own lock.
    with _file_lock(Path(f"{path}.alpa-tune-lock")):
        yield None


@contextlib.contextmanager
def _schema_lock(url: str, read_only: bool = False) -> Iterator[None]:
    """Held while a SQLite storage is opened (and its schema perhaps created); in-memory: no-op.

    Readers take it too: opening a file whose schema another process is creating makes Optuna
    create the missing tables beside it, and one of the two fails ("table studies already
    exists"). A reader creates no lock file: a creator makes it before the database file.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock = Path(f"{path}.alpa-tune-schema-lock")
    if read_only and not lock.exists():  # a file no alpa-tune writer has opened: none to wait for
        yield
        return
    if not read_only:
        require_folder(url, path)
    with _file_lock(lock, mode="r" if read_only else "a+"):
        yield


@contextlib.contextmanager
def _file_lock(path: Path, mode: str = "a+") -> Iterator[None]:
    """An exclusive flock on ``path`` (one host), released when the holder dies."""
    with open(path, mode) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# One autocommit connection per URL, kept for the process's life: taking the lock then costs
# two round trips (lock, unlock) instead of a pool checkout, a ping and a reset as well.
_lock_connections: dict[str, Any] = {}


@contextlib.contextmanager
def _postgres_lock(url: str, name: str) -> Iterator[Any]:
    import sqlalchemy

    key = zlib.crc32(name.encode()) - 2**31  # a stable signed 32-bit key
    for attempt in range(2):
        connection = _lock_connections.get(url)
        if connection is None or connection.closed or connection.invalidated:
            engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool,
                                              connect_args=_pg_connect_args(url))
            connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            _lock_connections[url] = connection
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            break
        except sqlalchemy.exc.DBAPIError as exc:
            _drop_lock_connection(url)
            # A kept connection that a server restart or the network killed: one fresh try now.
            if attempt or not exc.connection_invalidated:
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


def _rdb_of(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind ``storage``, for queries of our own; None for a journal.

    A study wraps the RDBStorage it is given in Optuna's ``_CachedStorage`` (``study._storage``),
    which has no engine: an ``isinstance(storage, RDBStorage)`` on it is always false, so the
    queries below silently took their slow fallbacks and the never-beat sweep did nothing.
    """
    if isinstance(storage, RDBStorage):
        return storage
    inner = getattr(storage, "_backend", None)  # _CachedStorage's; Optuna has no public accessor
    return inner if isinstance(inner, RDBStorage) else None


def read_study_attr(storage: BaseStorage, study_id: int, key: str, connection: Any = None) -> Any:
    """One study user attribute (None if unset). On an RDB one indexed query on ``connection``
    (the study lock's), not a load of every attribute through a pooled session (it runs per trial)."""
    if _rdb_of(storage) is not None and connection is not None:
        import sqlalchemy

        query = sqlalchemy.text("SELECT value_json FROM study_user_attributes WHERE study_id = :study AND key = :key")
        row = connection.execute(query, {"study": study_id, "key": key}).first()
        return None if row is None else json.loads(row[0])
    return storage.get_study_user_attrs(study_id).get(key)


def count_trial_states(storage: BaseStorage, study_id: int, connection: Any = None) -> dict[TrialState, int]:
    """Trials per state. On an RDB one GROUP BY query, not a load of every trial (it runs per
    trial); ``connection`` (the study lock's) saves a pool checkout."""
    counts = {state: 0 for state in TrialState}
    rdb = _rdb_of(storage)
    if rdb is not None:
        import sqlalchemy

        query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state")
        with contextlib.ExitStack() as stack:
            if connection is None:
                connection = stack.enter_context(rdb.engine.connect())
            for state, count in connection.execute(query, {"study": study_id}):
                counts[TrialState[state]] = count
        return counts
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        counts[trial.state] += 1
    return counts


# ---------------------------------------------------------------- faults: full disks and outages


class DiskFullError(StorageError, DiskFull):
    """The storage's disk is full: stop and say so, do not retry."""


class StorageLost(RuntimeError):
    """The storage stayed unreachable for longer than ``workers.storage_patience``."""


class TrialTakenOver(RuntimeError):
    """This worker's trial was failed by its heartbeat (the worker was cut off) and re-queued."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage call raises when the database, the network or the file system fails."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, StorageInternalError, OSError)


def disk_full_error(url: str) -> DiskFullError:
    """One line naming the full storage and what is left on its disk."""
    path = journal_or_sqlite_path(url)
    if scheme_of(url) == "postgresql":
        return DiskFullError(f"storage {mask_url(url)}: the PostgreSQL server's disk is full; free space there, "
                             "then start the workers again (stored trials are intact)")
    free = free_space(path) if path is not None else None
    left = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    return DiskFullError(f"storage {path}: the disk is full ({left}); free space or move the storage, "
                         "then run again (stored trials are intact)")


def check_free_space(path: Path, what: str, minimum: int = 64 * 2**20) -> None:
    """Refuse to start when the disk under ``path`` cannot hold even a little more.

    Storage files and outputs grow a little per trial; below ``minimum`` free a run would fail
    part-way, so it is refused before any work.
    """
    free = free_space(path)
    if free is not None and free < minimum:
        raise DiskFullError(f"{what} {path}: only {format_bytes(free)} free on its disk "
                            f"(at least {format_bytes(minimum)} needed); free space or choose another place")


class StorageGuard:
    """Waits out storage outages for one process, up to ``patience`` seconds each.

    ``call(fn, what)`` runs ``fn`` until it succeeds: on a storage error it says once what it is
    waiting for, backs off (1 s doubling to 10 s) and tries again; when the storage answers it
    says how long it was gone. A full disk is not an outage: it raises ``DiskFullError`` at once.
    Past the patience it raises ``StorageLost``. ``stop`` (a threading.Event) cuts a wait short.
    """

    def __init__(self, url: str, patience: float, log: Any = print, stop: Any = None) -> None:
        self.url = url
        self.patience = patience
        self.log = log
        self.stop = stop
        self.down_since: float | None = None
        self.up_since = float("-inf")  # when the storage last came back (monotonic)
        self._lock = threading.Lock()  # the worker's heartbeat thread reports here too
        self.outages = 0
        self.waited = 0.0

    def call(self, fn: Any, what: str, *, interruptible: bool = False) -> Any:
        """``fn()`` once the storage answers; None if ``interruptible`` and ``stop`` is set meanwhile.

        Recording a finished result is not interruptible: a stopping worker still waits (up to
        the patience) to write it.
        """
        delay = 1.0
        while True:
            try:
                result = fn()
            except storage_errors() as exc:
                self.failed(exc, what)
                down_since = self.down_since or time.monotonic()  # None if the heartbeat saw it come back
                wait = min(delay, max(0.0, down_since + self.patience - time.monotonic()) + 0.01)
                if interruptible and self.stop is not None and self.stop.wait(wait):
                    return None
                time.sleep(0 if interruptible and self.stop is not None else wait)
                delay = min(delay * 2, 10.0)
                continue
            self.succeeded()
            return result

    def failed(self, exc: BaseException, what: str) -> None:
        """Note a storage error; raise if it is a full disk or the patience has run out."""
        if is_disk_full(exc):
            raise disk_full_error(self.url) from None
        now = time.monotonic()
        with self._lock:
            first = self.down_since is None
            if first:
                self.down_since = now
                self.outages += 1
            down_since = self.down_since
        if first:
            reason = _reason(exc, self.url)
            self.log(f"storage unreachable ({reason}) while {what}; waiting for it "
                     f"(up to {self.patience:.0f}s, workers.storage_patience)")
        elif now - down_since > self.patience:
            raise StorageLost(f"storage {mask_url(self.url)} unreachable for {now - down_since:.0f}s "
                              f"(workers.storage_patience = {self.patience:.0f}s); giving up") from None

    def succeeded(self) -> None:
        with self._lock:
            down_since, self.down_since = self.down_since, None
            if down_since is None:
                return
            self.up_since = time.monotonic()
            gone = self.up_since - down_since
            self.waited += gone
        self.log(f"storage is back after {gone:.0f}s")

    def settled(self, seconds: float) -> bool:
        """True when the storage has answered for at least ``seconds`` since its last outage.

        After an outage every live worker's heartbeat is old: judging trials stale before the
        others have had a grace period to beat again would fail trials that are still training.
        """
        return self.down_since is None and time.monotonic() - self.up_since >= seconds


def running_trials_without_heartbeat(storage: BaseStorage, study_id: int) -> list[int]:
    """The RUNNING trials of a study with heartbeats that have never sent one ([] without heartbeats).

    Optuna's stale check skips a trial without any heartbeat. A worker that dies after its
    ``ask`` committed, before its first beat (its connection lost, its disk full), leaves such a
    trial behind: the workers fail it themselves (``workers._BudgetGate``), or it would hold a
    slot of the budget for ever.
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    rdb = _rdb_of(storage)
    if rdb is None or not is_heartbeat_enabled(storage):
        return []
    import sqlalchemy

    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL")
    with rdb.engine.connect() as connection:
        return [trial_id for (trial_id,) in connection.execute(query, {"study": study_id})]
