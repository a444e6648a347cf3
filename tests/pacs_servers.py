"""A real Orthanc PACS (with its DICOMweb plugin) and a real PostgreSQL server, started on free loopback ports.

Both come from Debian (``make pacs-deps``). Each lives in its own temporary folder with its config there, and is
stopped by ``stop()``. ``pacs/demo.py`` starts the same Orthanc for ``make pacs-demo``.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pacs.orthanc import ORTHANC_BINARY, OrthancServer, free_port

POSTGRES_BIN = Path("/usr/lib/postgresql")
POSTGRES_BOOT_SECONDS = 60

__all__ = ["ORTHANC_BINARY", "OrthancServer", "PostgresServer", "free_port", "orthanc_available",
           "postgres_available"]


def orthanc_available():
    """Whether Debian's Orthanc and its DICOMweb plugin are installed."""
    from pacs.orthanc import DICOMWEB_PLUGIN

    return Path(ORTHANC_BINARY).is_file() and Path(DICOMWEB_PLUGIN).exists()


def postgres_binaries():
    """The folder of the newest installed PostgreSQL's initdb and postgres, or None."""
    if not POSTGRES_BIN.is_dir():
        return None
    versions = sorted((path for path in POSTGRES_BIN.iterdir() if (path / "bin" / "initdb").is_file()),
                      key=lambda path: int(path.name) if path.name.isdigit() else 0)
    return versions[-1] / "bin" if versions else None


def postgres_available():
    """Whether Debian's PostgreSQL server is installed."""
    return postgres_binaries() is not None


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` in a temporary folder, ``postgres`` on a free port.

    ``initdb`` refuses to run as root, so when the tests run as root both run as the ``postgres`` user
    (``runuser -u postgres``), with the folder handed to that user. The unix socket lives in the folder too.
    """

    def __init__(self, folder=None):
        # Not under pytest's tmp_path: its 0700 parents would keep the postgres user out.
        self.folder = Path(folder or tempfile.mkdtemp(prefix="covidscan-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.log_path = self.folder / "postgres.log"
        self.binaries = postgres_binaries()
        self.process = None

    @property
    def url(self):
        """The SQLAlchemy URL of the ``postgres`` database over TCP on loopback."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, command):
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def start(self):
        """initdb, then start the server and wait until it accepts connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(
            self._as_postgres([str(self.binaries / "initdb"), "-D", str(self.data), "-U", "postgres",
                               "--auth=trust", "--no-sync", "-E", "UTF8"]),
            check=True, capture_output=True, cwd=self.folder,
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self._as_postgres([str(self.binaries / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                   "-h", "127.0.0.1", "-k", str(self.folder), "-c", "fsync=off"]),
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            )
        deadline = time.monotonic() + POSTGRES_BOOT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited with {self.process.returncode}:\n{self.log()}")
            ready = subprocess.run([str(self.binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"postgres did not start within {POSTGRES_BOOT_SECONDS} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self):
        """What the server has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        """Fast shutdown (SIGINT to the postmaster), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        # The postmaster itself, not runuser in front of it (which need not pass the signal on).
        pid_file = self.data / "postmaster.pid"
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        except (OSError, ValueError, IndexError):
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)
