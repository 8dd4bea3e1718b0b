"""Shared fixtures: tiny study configs on generated data, a throwaway PostgreSQL database."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("ALPA_TUNE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")

# Small enough that a trial takes a second or two on one CPU core.
TINY_CONFIG = """
name = "{name}"

[data]
source = "synthetic"
image_size = 16
num_classes = 4
samples_per_class = 24
imbalance_ratio = 4.0

[model]
backbone = "resnet10t"

[training]
folds = 2
epochs = {epochs}
batch_size = 32
lr = 0.003
threads = 1

[search]
n_trials = {n_trials}
sampler = "{sampler}"
pruner = "none"
seed = 0

[workers]
heartbeat_interval = 1
grace_period = 3
max_retries = 2
"""


def write_config(folder: Path, name: str = "tiny", *, epochs: int = 1, n_trials: int = 2,
                 sampler: str = "tpe") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(TINY_CONFIG.format(name=name, epochs=epochs, n_trials=n_trials, sampler=sampler))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real ``alpa-tune`` entry point in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if k != "ALPA_TUNE_STORAGE"}
    full_env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})})
    return subprocess.run([sys.executable, "-m", "alpa_tune", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def start_worker(study: str, url: str, *extra: str, cwd: Path | None = None,
                 log: Path | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A real ``alpa-tune worker`` process (output to ``log`` when given; run under ``prefix``, e.g.
    ``ip netns exec NS``, when given)."""
    env = {**os.environ, "ALPA_TUNE_STORAGE": url, "OMP_NUM_THREADS": "1"}
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([*prefix, sys.executable, "-m", "alpa_tune", "worker", study, "--threads", "1", *extra],
                            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, details: Callable[[], str] = lambda: ""):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``
    with ``details()`` (logs, stacks) in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")


def processes_of_this_test() -> list[int]:
    """The pids of every process this test started, however deep (they inherit its marker)."""
    needle = f"ALPA_TUNE_TEST_OWNER={os.environ['ALPA_TUNE_TEST_OWNER']}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def dump_stacks() -> None:
    """Ask every alpa-tune process of this test to write its threads' stacks to its log or stderr
    (``kill -USR1``), so that a test timing out shows where they were."""
    import signal

    for pid in processes_of_this_test():
        with contextlib.suppress(OSError):
            if b"alpa_tune" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[int | None]:
    """Exit codes; a process still running after ``timeout`` is killed and reported as None."""
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(None)
    return codes


def read_logs(paths: list[Path]) -> str:
    """The worker logs that exist, each under its name (for assertion messages)."""
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in paths if p.exists())


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Kill whatever a test left running (a failed assertion skips its own clean-up, and a
    launcher's workers live in sessions of their own): every process the test starts inherits a
    marker in its environment, and those still alive afterwards get SIGKILL."""
    import signal

    os.environ["ALPA_TUNE_TEST_OWNER"] = uuid.uuid4().hex
    try:
        yield
    finally:
        for pid in processes_of_this_test():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        del os.environ["ALPA_TUNE_TEST_OWNER"]

def _admin_engine():
    import sqlalchemy

    return sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the real local PostgreSQL (.ci/run starts it)."""
    import sqlalchemy

    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database for one test; dropped afterwards."""
    import sqlalchemy

    name = f"alpa_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    # The plain URL users write (alpa-tune picks the psycopg2 driver itself).
    yield "postgresql://" + pg_server.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"),
            {"name": name})
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


@pytest.fixture(scope="session")
def pg_password_server() -> str:
    """A private PostgreSQL that checks passwords (the shared one trusts everyone).

    Yields a URL whose password is right (alice:right-pw). Stopped at the end of the session.
    """
    from pgserver import PrivateServer

    try:
        server = PrivateServer(password="admin-pw")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        server.execute("CREATE ROLE alice LOGIN PASSWORD 'right-pw'", "CREATE DATABASE alpa OWNER alice")
        yield f"postgresql://alice:right-pw@127.0.0.1:{server.port}/alpa"
    finally:
        server.close()


@pytest.fixture
def private_pg():
    """A private trust-auth PostgreSQL that a test may stop and start (same port, same data)."""
    from pgserver import PrivateServer

    server = PrivateServer()
    try:
        yield server
    finally:
        server.close()


# --- small real disks: a tmpfs that fills up, or a read-only one -------------------------------
real_disk_usage = shutil.disk_usage  # some tests patch shutil's


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m", read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``where`` (root only, else the test is skipped), unmounted afterwards;
    ``read_only`` remounts it so: a folder even root cannot write in (permission bits do not stop root)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {(done.stderr or done.stdout).strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # still open somewhere


def fill_up(folder: Path, leave: int = 0) -> Path:
    """Another writer takes the space: a file grows until ``leave`` bytes (or nothing) are free."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while real_disk_usage(folder).free > leave:
            try:
                os.write(fd, b"\xff" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler
