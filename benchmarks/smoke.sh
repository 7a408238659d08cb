#!/usr/bin/env bash
# CI: every benchmark script still runs (its --smoke mode: tiny sizes, the CPU, seconds; the results file it
# writes goes to a temporary directory, never to benchmarks/results), and ruff and mypy stay clean.
# Every benchmarks/*.py is a benchmark script, and must have --smoke, except the modules the scripts import
# (MODULES below): a new script cannot be left out by mistake.
#   bash benchmarks/smoke.sh              # with .venv/bin/python, or PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMPDIR=$(mktemp -d)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
touch "$TMPDIR/start"

MODULES=" benchmarks/results_file.py benchmarks/pytest_subprocess.py benchmarks/stub_gpumem.py benchmarks/loop_clock.py "
for script in benchmarks/*.py; do
    [[ $MODULES == *" $script "* ]] && continue
    echo "== $script --smoke"
    start=$SECONDS
    "$python" "$script" --smoke
    echo "== $script --smoke: ok in $((SECONDS - start)) s"
done

written=$(find benchmarks/results -newer "$TMPDIR/start" -print)
[[ -z $written ]] || { echo "a --smoke run wrote into benchmarks/results: $written" >&2; exit 1; }

echo "== ruff check, ruff format --check, mypy"
"$python" -m ruff check pytest_gpumem benchmarks tests
"$python" -m ruff format --check pytest_gpumem benchmarks tests
"$python" -m mypy pytest_gpumem benchmarks
