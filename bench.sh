#!/usr/bin/env bash
# Thin wrapper: `python -m ds4cupy bench` with every argument passed through (see `bench.sh --help`).
# Works from a fresh checkout without installing: the repository root goes on PYTHONPATH. PYTHON picks the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m ds4cupy bench "$@"
