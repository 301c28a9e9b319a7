#!/bin/sh
# The prepared GPU check (issue 20): see benchmarks/gpu_check.py. Run in the repository root.
exec python3 benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu_check}" "$@"
