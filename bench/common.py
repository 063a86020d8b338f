"""Shared pieces of the benchmarks: servers in child processes on free loopback ports, machine facts, results.

Servers run as child processes (own session, so one killpg stops each) rather than threads: a server
thread would share the GIL with the code being measured and blur both its timings and its memory.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
AK = "bench-ak-0123456789"
LOAD_AT_START = os.getloadavg()  # other processes may share the 2 cores: recorded with the results
SK = "bench-sk-0123456789abcdefghijklmnopqrstuv"  # >= 32 bytes: HS256 keys shorter than that warn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@functools.cache
def python_loop_ms() -> float:
    """CPU milliseconds of a fixed pure-Python loop (the best of 5): the machine's speed for this kind of code,
    so that CPU figures of runs on different days can be compared (the machines here vary by 2x)."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        total = 0
        for i in range(1_000_000):
            total += i % 7
        best = min(best, time.process_time() - start)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    load = os.getloadavg()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python_loop_ms": python_loop_ms(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15_at_start": [round(x, 2) for x in LOAD_AT_START],
        "loadavg_1_5_15_at_end": [round(x, 2) for x in load],
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"command": " ".join([".venv/bin/python", *sys.argv]), "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    return path


class Child:
    """A server process in its own session; `stop()` signals its whole process group."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=env if env is not None else os.environ.copy())

    def wait_http(self, url: str, timeout: float = 60.0) -> float:
        """Seconds until `url` answers (any status below 500)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
            try:
                if httpx.get(url, timeout=1).status_code < 500:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url} within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._log.close()


class Emulator:
    """`kling-emulator serve` in a child process; the same inspection calls as the in-process handle."""

    def __init__(self, child: Child, base_url: str) -> None:
        self.child, self.base_url = child, base_url

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/_emulator/stats", timeout=30).json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_emulator/reset", timeout=30).raise_for_status()


@contextmanager
def emulator(log_dir: Path, *, time_scale: float, concurrency: int = 50,
             resolution: str = "small") -> Iterator[Emulator]:
    port = free_port()
    child = Child("kling-emulator", [str(BIN / "kling-emulator"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--access-key", AK, "--secret-key", SK, "--time-scale", str(time_scale),
                                     "--concurrency", str(concurrency), "--resolution", resolution], log_dir)
    try:
        base = f"http://127.0.0.1:{port}"
        child.wait_http(f"{base}/_emulator/stats")
        yield Emulator(child, base)
    finally:
        child.stop()


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """moto's S3 server (a child process: it keeps objects in its own memory, not ours); yields the endpoint."""
    port = free_port()
    child = Child("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_dir)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        child.wait_http(f"{endpoint}/")
        yield endpoint
    finally:
        child.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench-access-key",
            "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}


SERVER_PID: int | None = None  # the Prefect server this benchmark started (its CPU is reported)
# bench/run.py hands every part one server: BENCH_PREFECT_API_URL names it (and BENCH_PREFECT_SERVER_PID its pid).
SHARED_API = "BENCH_PREFECT_API_URL"


@contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[tuple[str, float]]:
    """One `prefect server start` for the whole benchmark; yields (api_url, seconds it took to be healthy).

    With BENCH_PREFECT_API_URL set (bench/run.py, the CI test), that server is used instead (0 s to start).
    `database_url`: PostgreSQL (see postgres()); default SQLite in `home`."""
    global SERVER_PID
    shared = os.environ.get(SHARED_API)
    if shared:
        pid = os.environ.get("BENCH_PREFECT_SERVER_PID")
        SERVER_PID = int(pid) if pid else None
        yield shared, 0.0
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api}
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    child = Child("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                     str(port)], home, env)
    try:
        took = child.wait_http(f"{api}/health", timeout=180)
        SERVER_PID = child.process.pid
        yield api, took
    finally:
        SERVER_PID = None
        child.stop()


@contextmanager
def postgres() -> Iterator[str | None]:
    """A private PostgreSQL cluster (the deployment tests' recipe, tests/flows/postgres.py): yields its
    database URL for a Prefect server, or None (and says why) when PostgreSQL cannot run here."""
    sys.path.insert(0, str(ROOT / "tests" / "flows"))
    try:
        from postgres import PostgresCluster, PostgresUnavailable  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL unavailable ({exc}): SQLite instead", flush=True)
        yield None
        return
    try:
        cluster.create_database("prefect")
        yield cluster.url("prefect")
    finally:
        cluster.stop()


def group_cpu_seconds(pgid: int | None) -> float:
    """User + system CPU seconds of every live process in a process group (a server and its children)."""
    if pgid is None:
        return 0.0
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


@contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not keep:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def kling_env(base_url: str, time_scale: float) -> dict[str, str]:
    """Pipeline settings for the emulator, with the poll bounds (5 s, 30 s) compressed by the time scale."""
    return {"KLING_PROVIDER": "kling", "KLING_API_BASE_URL": base_url, "KLING_ACCESS_KEY": AK,
            "KLING_SECRET_KEY": SK, "KLING_ALLOW_PRIVATE_URLS": "1",
            "KLING_POLL_MIN_SECONDS": f"{5 * time_scale:g}", "KLING_POLL_MAX_SECONDS": f"{30 * time_scale:g}"}


def stats(values: list[float]) -> dict[str, float]:
    """mean / median / p90 / min / max of a sample (rounded for the JSON)."""
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"n": len(values), "mean": round(sum(values) / len(values), 3), "median": round(pct(0.5), 3),
            "p90": round(pct(0.9), 3), "min": round(ordered[0], 3), "max": round(ordered[-1], 3)}
