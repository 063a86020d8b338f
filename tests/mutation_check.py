"""Mutation check of the money path: does the test net catch the one-line bugs that would make users pay twice
or deliver a wrong or half-written video? Not part of the suite (slow); rerun it after changing the tests:

    .venv/bin/python tests/mutation_check.py            # every mutation
    .venv/bin/python tests/mutation_check.py skip-lookup cap-boundary

Each mutation is applied to a scratch copy of the working tree (never to the tree itself), the tests named for
it run against that copy (PYTHONPATH puts it first, so the CLI subprocesses of the crash tests run the mutant
too), and the mutation counts as caught when they fail. Exit 1 if any mutation survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # what a user would suffer if it shipped
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "skip-lookup", "a rerun re-POSTs every step: paid twice where ids are not unique",
        "kling_tasks/api/submit.py",
        '    if search.found is not None:\n        return _from_search(client, kind, search, "found before POST")',
        '    if False:\n        return _from_search(client, kind, search, "found before POST")',
        ("tests/kling_tasks/api/test_submit.py", "tests/flows/test_crash_resume.py"),
    ),
    Mutation(
        "cache-on-index", "every job's step 1 shares one cached task: another job's video",
        "kling_tasks/identity.py",
        'return f"kling/{CACHE_VERSION}/{account}/submit/{external_id}"',
        'return f"kling/{CACHE_VERSION}/{account}/submit/{external_id.split(\'-s\')[-1][:2]}"',
        ("tests/kling_tasks/test_steps.py", "tests/flows/test_video.py"),
    ),
    Mutation(
        "write-without-rename", "a kill mid-download leaves a half-written video under its final name",
        "kling_tasks/storage/local.py",
        "os.replace(tmp_name, path)",
        "os.replace(tmp_name, path) if False else None",
        ("tests/kling_tasks/storage/test_crash.py", "tests/kling_tasks/test_storage.py"),
    ),
    Mutation(
        "no-attempt-bump", "--resubmit-failed re-adopts the failed task: the job can never finish",
        "kling_tasks/preflight.py",
        'attempt = record.attempt + (1 if resubmit_failed and record.status == "failed" else 0)',
        "attempt = record.attempt",
        ("tests/flows/test_video.py",),
    ),
    Mutation(
        "cap-boundary", "a plan of exactly 180 s is refused (or, the other way, one over it is paid for)",
        "kling_tasks/jobs.py",
        "    if worst > MAX_EXTENDED_SECONDS:",
        "    if worst >= MAX_EXTENDED_SECONDS:",
        ("tests/kling_tasks/test_jobs.py",),
    ),
    Mutation(
        "trust-any-object", "a folder's old video of another task is kept as this step's",
        "kling_tasks/steps.py",
        "        return obj.task_id == task_id\n    return proven_sha256 is not None and obj.sha256 == proven_sha256",
        "        return True\n    return True",
        ("tests/kling_tasks/test_steps.py", "tests/flows/test_identity.py"),
    ),
    Mutation(
        "no-account-in-key", "another account's cached task is reused: its video, or a 1203 forever",
        "kling_tasks/identity.py",
        'return f"kling/{CACHE_VERSION}/{account}/wait/{task_id}"',
        'return f"kling/{CACHE_VERSION}/wait/{task_id}"',
        ("tests/kling_tasks/test_steps.py",),
    ),
)


def scratch_copy() -> Path:
    target = Path(tempfile.mkdtemp(prefix="kling-mutant-"))
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
                                    ".ruff_cache", "demo-output", "kling-output")
    shutil.copytree(ROOT, target / "tree", ignore=ignore)
    return target / "tree"


def run(mutation: Mutation) -> tuple[bool, float, str]:
    tree = scratch_copy()
    try:
        source = tree / mutation.path
        text = source.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"{mutation.name}: the line to mutate is not in {mutation.path} exactly once; "
                             "update tests/mutation_check.py to the current code")
        source.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        started = time.monotonic()
        result = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=tree, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith(("FAILED ", "ERROR tests/"))]
        summary = lines[0] if lines else (result.stdout.strip().splitlines() or [""])[-1]
        return result.returncode != 0, time.monotonic() - started, summary
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"mutations to run (default all: {[m.name for m in MUTATIONS]})")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    survivors = 0
    for mutation in chosen:
        caught, seconds, summary = run(mutation)
        survivors += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {mutation.name:22} {seconds:6.0f} s  {summary}", flush=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
