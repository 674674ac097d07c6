#!/usr/bin/env bash
# The GPU check a lent device runs once (scripts/gpu_check.py): one JSON file of figures, in at most 8 minutes.
#   bash scripts/gpu_check.sh [--dry-run] [--out FILE]     (PYTHON: the interpreter with a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-gpu_check.json}"
exec timeout 480 "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
