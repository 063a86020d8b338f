#!/usr/bin/env bash
# The project's two front-door commands, on a machine that has only Python 3.11+:
#   ./dev.sh demo   - runs the demo: emulator + local folder + Prefect's embedded server
#   ./dev.sh test   - runs ruff, mypy and the whole pytest suite
# Both create .venv and install the project into it on first use.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PREFECT_SERVER_ANALYTICS_ENABLED=false

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e ".[dev]"
        touch .venv/.installed
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        ensure_venv
        exec .venv/bin/kling-pipeline demo "$@"
        ;;
    test)
        ensure_venv
        .venv/bin/ruff check .
        .venv/bin/mypy
        # Three workers, one test file each at a time (files share module-scoped servers); -n 0 runs in-process.
        # Three on two cores: the longest files mostly wait (heartbeats, Kling's scaled task times, leases).
        exec .venv/bin/pytest -n 3 --dist loadfile --durations=30 "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
