"""Storage URLs parsed by SQLAlchemy, masked passwords, transient errors told by SQLSTATE, and an
import that leaves the process alone: on real SQLite files and real PostgreSQL servers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from conftest import cli, write_config

from alpa_tune.storage import StorageError, _is_transient, driver_url, open_storage, study_lock


def _assert_named_after_q_db(folder: Path) -> None:
    names = {path.name for path in folder.iterdir()} - {"tiny.toml", "alpa-tune-out"}
    assert "q.db" in names
    assert not any("?" in name or "timeout" in name for name in names), names
    assert names <= {"q.db", "q.db-wal", "q.db-shm", "q.db.alpa-tune-schema-lock", "q.db.alpa-tune-lock"}, names
    with sqlite3.connect(folder / "q.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_url_with_a_query_opens_the_file_without_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db?timeout=5"
    storage = open_storage(url)
    with study_lock(url, "tiny"):
        optuna.create_study(study_name="tiny", storage=storage)
    _assert_named_after_q_db(tmp_path)
    assert (tmp_path / "q.db.alpa-tune-lock").exists() and (tmp_path / "q.db.alpa-tune-schema-lock").exists()
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/q.db").study_name == "tiny"


def test_sqlite_url_with_a_query_through_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    url = f"sqlite:///{tmp_path}/q.db?timeout=5"
    created = cli("study", "create", str(config), "--storage", url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    _assert_named_after_q_db(tmp_path)
    listed = cli("study", "list", "--storage", url, cwd=tmp_path)
    assert listed.returncode == 0 and "tiny" in listed.stdout, listed.stderr


# Opens each of N fresh SQLite files at its own moment: the creator at once, a reader as soon as
# the file appears (as a dashboard or `study list` started beside a first run does).
_OPEN_EACH_NEW_FILE = r"""
import sys, time
from pathlib import Path
from alpa_tune.storage import open_storage
folder, start, role, count = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for i in range(count):
    path = folder / f"race{i}.db"
    time.sleep(max(0.0, start + i * 0.5 - time.time()))
    while role == "reader" and not path.exists():
        pass
    try:
        open_storage(f"sqlite:///{path}", read_only=role == "reader")
        print("ok", flush=True)
    except Exception as exc:
        print(f"{path.name}: {exc}", flush=True)
"""


def test_readers_opening_a_sqlite_file_while_it_is_created_break_nothing(tmp_path: Path) -> None:
    """A reader meeting a file whose schema is being created used to create tables beside the
    creator: "table studies already exists" for one of them (9 of 20 creators failed)."""
    count, start = 20, time.time() + 8  # every process imported before the first file
    roles = ("creator", "reader", "reader")
    processes = [subprocess.Popen([sys.executable, "-c", _OPEN_EACH_NEW_FILE, str(tmp_path), str(start), role,
                                   str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for role in roles]
    results = {role + str(k): process.communicate(timeout=300) for k, (role, process) in
               enumerate(zip(roles, processes))}
    for who, (out, err) in results.items():
        assert out.split() == ["ok"] * count, f"{who}:\n{out}{err}"
    for i in range(count):
        with sqlite3.connect(tmp_path / f"race{i}.db") as connection:
            assert connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1


def test_failing_open_masks_the_password(pg_server: str) -> None:
    # The local server trusts everyone, so the password is ignored and the role is what fails.
    url = "postgresql://no_such_user:secret@127.0.0.1:5432/db"
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    assert "secret" not in str(caught.value) and "no_such_user:***@127.0.0.1" in str(caught.value)
    done = cli("study", "list", "--storage", url)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot open storage"), done.stderr
    assert "secret" not in done.stderr + done.stdout and done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("url", ["postgresql://user:secret@host:notaport/db", "no-scheme-secret.db"])
def test_malformed_url_is_one_masked_line(tmp_path: Path, url: str) -> None:
    with pytest.raises(StorageError, match="malformed"):
        open_storage(url)
    done = cli("study", "list", "--storage", url, cwd=tmp_path)
    assert done.returncode == 2 and "malformed" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    if "user:" in url:
        assert "secret" not in done.stderr


def test_driver_url_names_psycopg2_and_keeps_the_rest() -> None:
    assert driver_url("postgresql://u:p%40ss@h:5433/db?sslmode=require") == \
        "postgresql+psycopg2://u:p%40ss@h:5433/db?sslmode=require"
    assert driver_url("sqlite:///q.db?timeout=5") == "sqlite:///q.db?timeout=5"


def _error(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no error raised")


def test_terminated_backend_is_transient(pg_url: str) -> None:
    admin = sqlalchemy.create_engine(driver_url(pg_url), isolation_level="AUTOCOMMIT")
    engine = sqlalchemy.create_engine(driver_url(pg_url))
    raw = psycopg2.connect(driver_url(pg_url).replace("postgresql+psycopg2", "postgresql"))
    try:
        connection = engine.connect()
        pid = connection.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
        with admin.connect() as session:
            for victim in (pid, raw.get_backend_pid()):
                session.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": victim})
        time.sleep(0.5)  # the server's goodbye is waiting in the socket when the query is sent
        through_sqlalchemy = _error(lambda: connection.execute(sqlalchemy.text("SELECT 1")))
        assert _is_transient(through_sqlalchemy, pg_url), repr(through_sqlalchemy)
        through_psycopg2 = _error(lambda: raw.cursor().execute("SELECT 1"))
        assert isinstance(through_psycopg2, psycopg2.OperationalError)
        assert _is_transient(through_psycopg2, pg_url), repr(through_psycopg2)
    finally:
        raw.close()
        engine.dispose()
        admin.dispose()


def test_stopped_server_is_transient_and_waited_out(private_pg) -> None:
    url = private_pg.admin_url()
    private_pg.stop()
    refused = _error(lambda: sqlalchemy.create_engine(driver_url(url)).connect())
    assert _is_transient(refused, url), repr(refused)
    # A worker starting while the server restarts opens the storage once it is back.
    restart = threading.Timer(1.0, private_pg.start)
    restart.start()
    try:
        open_storage(url)
    finally:
        restart.join()


def test_server_shutting_down_is_transient(private_pg) -> None:
    """A smart shutdown waits for a session to end and refuses new ones meanwhile ("the database
    system is shutting down", no SQLSTATE on connect): a worker starting then waits, it does not quit."""
    url = private_pg.admin_url()
    session = psycopg2.connect(driver_url(url).replace("postgresql+psycopg2", "postgresql"))
    stopping = threading.Thread(target=private_pg.stop, args=("smart",))
    stopping.start()
    try:
        def refused_while_stopping() -> BaseException | None:
            try:  # no pool: a kept session would hold the smart shutdown open
                sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool).connect().close()
            except sqlalchemy.exc.OperationalError as error:
                return error if "shutting down" in str(error) else None
            return None

        deadline = time.monotonic() + 20
        refused = refused_while_stopping()
        while refused is None and time.monotonic() < deadline:
            time.sleep(0.2)
            refused = refused_while_stopping()
        assert refused is not None, "the server never refused a connection while shutting down"
        assert _is_transient(refused, url), repr(refused)
    finally:
        session.close()
        stopping.join()
        private_pg.start()


def test_wrong_password_is_not_transient_and_fails_at_once(pg_password_server: str) -> None:
    wrong = pg_password_server.replace("right-pw", "wr0ng-pw")
    refused = _error(lambda: sqlalchemy.create_engine(driver_url(wrong)).connect())
    assert not _is_transient(refused, wrong), repr(refused)
    started = time.monotonic()
    with pytest.raises(StorageError, match="password authentication failed") as caught:
        open_storage(wrong)
    assert time.monotonic() - started < 3  # no retries
    assert "wr0ng-pw" not in str(caught.value)


def test_missing_database_is_not_transient(pg_server: str) -> None:
    url = pg_server.rsplit("/", 1)[0] + "/alpa_no_such_db"
    missing = _error(lambda: sqlalchemy.create_engine(url).connect())
    assert not _is_transient(missing, url), repr(missing)


def test_import_leaves_optuna_logging_and_warnings_alone() -> None:
    probe = (
        "import warnings, optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.DEBUG)\n"
        "before = (optuna.logging.get_verbosity(), list(warnings.filters))\n"
        "import alpa_tune.storage\n"
        "after = (optuna.logging.get_verbosity(), list(warnings.filters))\n"
        "assert before == after, (before, after)\n"
        "alpa_tune.storage.quiet_optuna()\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.WARNING\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_postgres_sessions_end_when_their_worker_vanishes_and_url_options_still_apply(pg_url: str) -> None:
    """Every session asks the server to end it if its worker vanishes (idle in a transaction,
    keepalives); an ``options`` the user put in the URL is kept and wins over ours."""
    url = f"{pg_url}?options=-c%20statement_timeout%3D7000%20-c%20tcp_keepalives_idle%3D45"
    storage = open_storage(url)
    with storage.engine.connect() as connection:
        shown = {name: connection.execute(sqlalchemy.text(f"SHOW {name}")).scalar()
                 for name in ("idle_in_transaction_session_timeout", "tcp_keepalives_idle",
                              "tcp_keepalives_count", "statement_timeout")}
    assert shown == {"idle_in_transaction_session_timeout": "30s", "tcp_keepalives_idle": "45",
                     "tcp_keepalives_count": "3", "statement_timeout": "7s"}
    with study_lock(url, "any") as connection:
        assert connection.execute(sqlalchemy.text("SHOW idle_in_transaction_session_timeout")).scalar() == "30s"
