#!/usr/bin/env bash
# Set up calibdrop in ./.venv: install it with its pinned dependencies, then fetch and
# verify the default model and the calibration distributions. Debian packages come from
# apt: when apt's lists lack a pinned version, `calibdrop data fetch` refreshes them once
# (as root; otherwise it prints the command to run). Safe to rerun.
#   CALIBDROP_TORCH  pip requirement for torch (default torch==2.13.0, the CPU build;
#                    set it to "" to keep a torch you installed yourself, e.g. a CUDA build)
#   PYTHON           interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH=${CALIBDROP_TORCH-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q $TORCH -e '.[dev]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import analysis, torch, transformers" || { echo "setup.sh: installing calibdrop failed (see pip's output above)" >&2; exit 1; }
.venv/bin/calibdrop models fetch --dequantise
.venv/bin/calibdrop data fetch
