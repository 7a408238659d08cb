#!/usr/bin/env bash
# Creates .venv (if missing) and installs pytest-gpumem with the example suite's
# and the tests' dependencies. CPU torch is installed first, and pinned, so that
# pip never pulls a multi-GB CUDA build onto a CPU-only machine; set
# GPUMEM_TORCH to other pip arguments to choose your own (e.g.
# "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # GPUMEM_TORCH may hold several pip arguments
.venv/bin/python -m pip install -q ${GPUMEM_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[models,test]"
