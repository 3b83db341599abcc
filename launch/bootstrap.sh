#!/usr/bin/env bash
# Set up (or reuse) .venv and run the demo or the tests; works on a fresh machine with Python.
#   launch/bootstrap.sh demo [key=value ...]   # prep + train + eval on the embedded corpus
#   launch/bootstrap.sh test [pytest args ...] # the default test suite, on every core
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # A CPU machine must never pull the multi-GB CUDA build of torch by accident.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$STAMP"
fi
cmd=${1:?usage: launch/bootstrap.sh demo|test [args...]}; shift
case "$cmd" in
  demo) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
        exec "$VENV/bin/python" -m cope_megatron demo "$@" ;;
  # One single-threaded pytest-xdist worker per core; a later -n 0 runs the suite serially.
  test) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        exec "$VENV/bin/python" -m pytest -n auto "$@" ;;
  *) echo "unknown command $cmd (demo|test)" >&2; exit 2 ;;
esac
