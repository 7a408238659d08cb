#!/usr/bin/env bash
# Creates .venv (if missing) and installs pytest-gpumem with the example suite's
# and the tests' dependencies. CPU torch is installed first, and pinned, so that
# pip never pulls a multi-GB CUDA build onto a CPU-only machine; set
# GPUMEM_TORCH to another requirement (e.g. "torch") to choose your own.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || test -x .venv/bin/python
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${GPUMEM_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[examples,test]"
