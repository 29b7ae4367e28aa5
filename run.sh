#!/usr/bin/env bash
# The README's commands. Each creates (once) its own virtual environment in .venv from the
# project's files, then runs:
#   ./run.sh quickstart   the main job: train a small ATLAS model on a real task, print the result
#   ./run.sh test         the default test suite (slow tests excluded)
#   ./run.sh test-slow    the slow tests only
#   ./run.sh lint         ruff check + ruff format --check
#   ./run.sh typecheck    pyright
# ATLAS_EQX_EXTRAS adds extras to the environment (CI sets `bench` for the torch cross-checks).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.installed"

export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/atlas-eqx-xla}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}"

EXTRAS="test,dev,plot${ATLAS_EQX_EXTRAS:+,$ATLAS_EQX_EXTRAS}"

ensure_venv() {
    if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$EXTRAS" ]; then
        echo "setting up $VENV with [$EXTRAS] (once) ..." >&2
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
        echo "$EXTRAS" >"$STAMP"
    fi
}

run_pytest() {
    set +e
    # Two pytest-xdist workers (PYTEST_WORKERS overrides): on two cores the suite ran in 6.3
    # minutes cold against 8.7 in one process.
    HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" "$VENV/bin/pytest" -q -n "${PYTEST_WORKERS:-2}" "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: this is a failure" >&2
        return 1
    fi
    return "$rc"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    quickstart) ensure_venv; exec "$VENV/bin/atlas-eqx" quickstart "$@" ;;
    test) ensure_venv; run_pytest "$@" ;;
    test-slow) ensure_venv; run_pytest -m slow "$@" ;;
    lint) ensure_venv; "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . ;;
    typecheck) ensure_venv; "$VENV/bin/pyright" ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
