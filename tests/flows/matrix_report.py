"""The figures of docs/reliability.md from a matrix run's $KLING_MATRIX_REPORT (JSON lines).

    KLING_MATRIX=full KLING_MATRIX_REPORT=/tmp/matrix.jsonl .venv/bin/pytest -n 0 \\
        tests/flows/test_fault_matrix.py tests/flows/test_kill_matrix.py
    .venv/bin/python tests/flows/matrix_report.py /tmp/matrix.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def figures(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    faults = [r for r in records if r["matrix"] == "fault"]
    jobs = [r for r in records if r["matrix"] == "kill-job"]
    batches = [r for r in records if r["matrix"] == "kill-batch"]
    clean = {what: [r["seconds"] for r in records if r["matrix"] == "kill-clean" and r["what"] == what]
             for what in ("job", "batch")}
    start_up = {what: ", ".join(str(r["start_up"]) for r in records
                                if r["matrix"] == "kill-clean" and r["what"] == what and "start_up" in r)
                for what in ("job", "batch")}
    outcomes = Counter(r["outcome"] for r in faults)
    rows = [
        ("seed", ", ".join(sorted({str(r["seed"]) for r in records}))),
        ("fault cases (kind x stage x provider) passed",
         f"{len(faults)}: {len({r['fault'] for r in faults})} kinds, {len({(r['fault'], r['stage']) for r in faults})}"
         f" kind x stage cells, {len({r['provider'] for r in faults})} providers, sinks "
         f"{dict(Counter(r['sink'] for r in faults))}"),
        ("fault outcomes", ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))),
        ("faults fired", str(sum(r["fired"] for r in faults))),
        ("create POSTs / tasks (fault cases)",
         f"{sum(r['posts'] for r in faults)} / {sum(r['tasks'] for r in faults)}"),
        ("clean runs (s, flow run start to exit): 1 + 3 job; batch",
         f"{', '.join(map(str, clean['job'])) or '-'}; {', '.join(map(str, clean['batch'])) or '-'}"),
        ("clean runs' start-up before the flow run (s): 1 + 3 job; batch",
         f"{start_up.get('job') or '-'}; {start_up.get('batch') or '-'}"),
        ("kills of the 1 + 3 job (landed / drawn, re-drawn)", kill_text(jobs)),
        ("kills of the batch (landed / drawn, re-drawn)", kill_text(batches)),
        ("span the landed moments were drawn over (s): job; batch", f"{span_text(jobs)}; {span_text(batches)}"),
        ("landed kill moments (u in [0, 1))",
         f"{len(jobs) + len(batches)}: min {min((r['u'] for r in jobs + batches), default=0):.3f}, "
         f"max {max((r['u'] for r in jobs + batches), default=0):.3f}"),
        ("where the job kills landed (the ledger's front step)", stage_text(jobs)),
        ("where the batch kills landed", stage_text(batches)),
        ("reruns needed after a kill", dict_text(Counter(r["reruns"] for r in jobs + batches))),
        ("create POSTs / tasks (kill cases, landed runs)",
         f"{sum(r['posts'] for r in jobs + batches)} / {sum(r['tasks'] for r in jobs + batches)}"),
        ("duplicate tasks (an external id with two tasks)",
         str(sum(r["duplicates"] for r in faults + jobs + batches))),
        ("lost results (a case not finished whole)", "0 (every recorded case passed its checks)"),
    ]
    return rows


def kill_text(kills: list[dict[str, Any]]) -> str:
    """Every recorded case landed one kill; a draw whose run had exited before its moment was drawn again."""
    drawn = sum(r["draws"] for r in kills)
    return f"{len(kills)} / {drawn}, {drawn - len(kills)} re-drawn (the run had exited before the moment)"


def span_text(kills: list[dict[str, Any]]) -> str:
    spans = [r["span"] for r in kills]
    return f"{min(spans)} to {max(spans)}" if spans else "-"


STATUS_ORDER = ("submitting", "submitted", "processing", "succeed", "failed", "stored")


def stage_order(kill: dict[str, Any]) -> tuple[int, int]:
    """Where a kill landed, in the order a run goes: the batch by steps stored, a job by its ledger's front."""
    if kill["matrix"] == "kill-batch":
        return int(kill["stage"].split()[0]), 0
    if kill["ledger"] == "-":
        return -2, 0
    statuses = kill["ledger"].split(",")
    begun = [i for i, status in enumerate(statuses) if status != "pending"]
    if not begun:
        return -1, 0
    return begun[-1], STATUS_ORDER.index(statuses[begun[-1]])


def stage_text(kills: list[dict[str, Any]]) -> str:
    counts = Counter(r["stage"] for r in kills)
    first = {r["stage"]: stage_order(r) for r in sorted(kills, key=stage_order, reverse=True)}
    return ", ".join(f"{stage}: {counts[stage]}" for stage in sorted(counts, key=first.__getitem__)) or "-"


def dict_text(counter: Counter[Any]) -> str:
    return ", ".join(f"{n} x {key}" for key, n in sorted(counter.items())) or "-"


def main(path: str) -> None:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| figure | value |\n|---|---|")
    for name, value in figures(records):
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main(sys.argv[1])
