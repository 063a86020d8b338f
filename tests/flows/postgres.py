"""Throw-away PostgreSQL and Prefect servers for the deployment tests.

PostgresCluster: a private cluster (initdb + pg_ctl) in a temporary folder, listening on 127.0.0.1 at a free port
and on a Unix socket inside that folder, never the machine's default cluster. initdb refuses to run as root, so
as root every PostgreSQL command runs as the `postgres` user (Debian's package creates it). Durability is
switched off (fsync, synchronous commits): the data lives for one test module.

PrefectServerProcess: `prefect server start` in its own process group, on the database its environment names
(PREFECT_SERVER_DATABASE_CONNECTION_URL: such a cluster; without it, SQLite in its PREFECT_HOME).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here; the message says why (the tests skip with it)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bindir() -> Path | None:
    """Debian's /usr/lib/postgresql/<version>/bin (newest), or wherever initdb is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    def __init__(self, bindir: Path, root: Path, as_postgres: bool) -> None:
        self.bindir, self.root, self.as_postgres = bindir, root, as_postgres
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self.running = False

    @classmethod
    def start(cls, attempts: int = 3) -> PostgresCluster:
        """A running cluster, or PostgresUnavailable saying why not."""
        bindir = postgres_bindir()
        if bindir is None:
            raise PostgresUnavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        as_postgres = os.geteuid() == 0
        owner = None
        if as_postgres:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no `postgres` user for initdb") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and `runuser` is missing (util-linux)")
        root = Path(tempfile.mkdtemp(prefix="kling-pg-"))
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        cluster = cls(bindir, root, as_postgres)
        try:
            cluster._initdb()
            for attempt in range(1, attempts + 1):
                cluster.port = free_port()
                if cluster._pg_ctl_start():
                    cluster.running = True
                    return cluster
                if attempt == attempts:
                    raise PostgresUnavailable(f"PostgreSQL did not start: {cluster.log_tail()}")
        except BaseException:
            cluster.stop()
            raise
        raise AssertionError("unreachable")

    def _command(self, name: str, *args: str) -> list[str]:
        command = [str(self.bindir / name), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_postgres else command

    def _run(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command(name, *args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, check=False)

    def _initdb(self) -> None:
        done = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                         "--no-sync", "--no-instructions")
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def _pg_ctl_start(self) -> bool:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                         "start", timeout=90)
        return done.returncode == 0

    def log_tail(self) -> str:
        try:
            return self.log.read_text()[-1500:]
        except OSError:
            return "(no log)"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        done = subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", "postgres", name], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr.strip()}")

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


class ServerExited(RuntimeError):
    """The server ended before serving (typically: its port was taken between pick and bind)."""


class PrefectServerProcess:
    """`prefect server start` in its own process group, on a free port."""

    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port = home, port
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.env = {**env, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": self.api_url}
        self.log = open(home / "server.log", "w")  # noqa: SIM115 - closed in stop()
        prefect = str(Path(sys.executable).with_name("prefect"))
        self.process = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                        env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @classmethod
    def start(cls, env: dict[str, str], root: Path, attempts: int = 3) -> PrefectServerProcess:
        """A healthy server of ours (its /admin/settings report our home); a new home and port per attempt."""
        for attempt in range(1, attempts + 1):
            home = root / f"server-{attempt}"
            home.mkdir()
            server = cls(home, free_port(), env)
            try:
                server.wait_healthy()
                return server
            except ServerExited:
                server.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                server.stop()
                raise
        raise AssertionError("unreachable")

    def _is_ours(self) -> bool:
        try:
            if httpx.get(f"{self.api_url}/health", timeout=2).status_code != 200:
                return False
            settings = httpx.get(f"{self.api_url}/admin/settings", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return isinstance(settings, dict) and Path(str(settings.get("home"))).resolve() == self.home.resolve()

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(f"prefect server exited: {self.log_tail()}")
            if self._is_ours():
                return
            time.sleep(0.3)
        raise TimeoutError(f"prefect server did not become healthy: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_group(self.process)
        self.log.close()


def stop_group(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process's group, SIGKILL it if it lingers; always reaps the process."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        process.wait()
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
