"""The benchmarks keep working: `bench/run.py --quick` (every part at its smallest, all at once, on the session's
Prefect server) produces every figure and the page. Asserts that figures were produced, never how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def result(name: str, output: str = "") -> dict[str, Any]:
    path = RESULTS / f"{name}-quick.json"
    assert path.exists(), f"bench part {name} wrote no figures; bench/run.py said:\n{output[-4000:]}"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_every_benchmark_produces_its_figures_and_the_page(prefect_server: Any, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    for stale in RESULTS.glob("*-quick.json"):
        stale.unlink()
    env = {**os.environ, "BENCH_PREFECT_API_URL": prefect_server.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--doc", str(doc)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr

    polling = result("polling", output)
    policies = {r["policy"] for r in polling["measured"]}
    assert {"learned", "adaptive:5:15", "fixed:5", "fixed:10", "fixed:15"} <= policies
    assert all(r["polls"]["n"] > 0 and r["client_polls_match"] for r in polling["measured"])
    assert {m["policy"] for m in polling["model"]} == policies
    overhead = result("overhead", output)
    loads = overhead["runs"] + overhead["steady"]
    assert overhead["runs"] and overhead["steady"], "both loads ran: burst and steady"
    assert all(r["succeeded"] == r["jobs"] for r in loads)
    assert all(r["overhead_per_step_s"]["n"] == r["jobs"] and r["cpu_per_step_s"] > 0 for r in loads)
    assert all(r["leases_expired"] == 0 for r in loads), "a few short jobs renew no lease late"
    assert all(r["detection_per_step_s"]["n"] == r["jobs"] and r["detection_per_step_s"]["mean"] > 0 for r in loads), \
        "the detection delay is measured (the emulator's final_seen_at) for every job"
    assert all(r["prefect_calls_per_step"]["events"].get("prefect.task-run.*", 0) >= 9 for r in loads), \
        "the Prefect calls are counted: three task runs per step, each Pending, Running, Completed"
    assert all(r["pipeline_phases_per_step_s"]["jobs"] == r["jobs"] for r in loads), \
        "every job's own time is split into its phases (its flow run, task runs and the emulator's clock)"
    assert all(r["pipeline_phases_per_step_s"][k] >= 0 for r in loads for k in ("subflow_start", "end_store")), \
        "phases are spans in order"
    floor = overhead["prefect_floor"]
    assert floor["task_run_ms"] > 0 and floor["subflow_run_ms"] > 0, "Prefect's own CPU per empty run is measured"
    batch = result("batch", output)
    assert batch["batch"]["tasks"] == batch["jobs"] * batch["steps"] and batch["baseline"]["wall_s"] > 0
    makespan = result("makespan", output)
    assert [r["name"].split(" (")[0] for r in makespan["runs"]] == ["flow local", "rerun local"]
    transfer = result("run", output)["transfer"]  # bench/run.py keeps the transfer figures in its own file
    assert set(transfer["managed_vs_upload_file"]) == {str(n) for n in transfer["sizes_mb"]}, \
        "the store's paired ratio to upload_file at every size"
    rerun = result("rerun", output)
    assert rerun["reruns"] and all(r["creates"] == 0 for r in rerun["reruns"])  # a rerun never creates

    page = doc.read_text()
    for heading in ("## 1. Polling", "## 3. Overhead", "## 4. Makespan", "## 5. Rerun", "## 2. Transfer"):
        assert heading in page
    assert "No figures" not in page and "| learned (new default) |" in page
