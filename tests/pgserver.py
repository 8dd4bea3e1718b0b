"""A private PostgreSQL server for tests that must stop, restart or cut off their database.

Started from the installed server binaries as the postgres user in a folder of its own, so
stopping it never takes the shared local server (and every other test's database) down.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


class PrivateServer:
    """``initdb`` + ``pg_ctl`` on a free port; ``stop``/``start`` reuse the same port and data folder.

    ``password``: the postgres superuser's password (scram-sha-256); None means trust auth.
    ``listen``: the address to listen on (a veth address for network tests).
    ``prefix``: the command its programs run under, e.g. ``ip netns exec NS`` to serve from a
    network namespace (the default: none, this machine's own network).
    """

    def __init__(self, *, password: str | None = None, listen: str = "127.0.0.1", port: int | None = None,
                 prefix: Sequence[str] = ()) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin_dir = binaries[-1]
        self.listen = listen
        self.password = password
        self.prefix = list(prefix)
        # Outside pytest's root-only temp tree: the server runs as the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="alpa-tune-pg-"))
        self.data = self.folder / "data"
        shutil.chown(self.folder, "postgres")
        self.port = port or _free_port()
        auth = ["--auth=trust"]
        if password is not None:
            password_file = self.folder / "pw"
            password_file.write_text(password + "\n")
            shutil.chown(password_file, "postgres")
            auth = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        self._as_postgres(f"{self.bin_dir}/initdb", "-D", str(self.data), "-U", "postgres", *auth)
        # Accept TCP from anywhere the server listens (a veth address is not 127.0.0.1).
        method = "trust" if password is None else "scram-sha-256"
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all 0.0.0.0/0 {method}\n")
        self.start()

    def admin_url(self, database: str = "postgres") -> str:
        auth = "postgres" if self.password is None else f"postgres:{self.password}"
        return f"postgresql://{auth}@{self.listen}:{self.port}/{database}"

    def start(self) -> None:
        self._as_postgres(f"{self.bin_dir}/pg_ctl", "-D", str(self.data), "-w", "-l", str(self.folder / "log"),
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses={self.listen}", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(f"{self.bin_dir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin_dir}/pg_ctl", "-D", str(self.data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def execute(self, *statements: str, database: str = "postgres") -> None:
        import sqlalchemy

        url = self.admin_url(database).replace("postgresql://", "postgresql+psycopg2://", 1)
        engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for statement in statements:
                    connection.execute(sqlalchemy.text(statement))
        finally:
            engine.dispose()

    def _as_postgres(self, *command: str) -> None:
        done = subprocess.run([*self.prefix, "runuser", "-u", "postgres", "--", *command], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
