#!/usr/bin/env bash
# Rerun every reference result under benchmarks/results/ on this machine (see reference.toml).
# Needs the bench extra: pip install -e '.[bench]'. The Redis baseline also needs redis-server
# (Debian/Ubuntu: apt-get install redis-server); without it that baseline is skipped.
# Extra arguments go to `fusee bench`, e.g. --no-progress. Then the MN-kill timelines.
# It measures the build `pip install fusee` runs (the fast path compiled by mypyc: needs the lint
# extra); `benchmarks/run_all.sh --build source ...` measures the checkout's .py files
# (benchmarks/with_build.sh). Each results.json names its build (machine.fast_path).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=compiled
if [ "${1:-}" = --build ]; then BUILD=${2:-}; shift 2 || true; fi
if [ -z "${FUSEE_RUN_ALL_BUILD:-}" ]; then
  FUSEE_RUN_ALL_BUILD=$BUILD exec benchmarks/with_build.sh "$BUILD" "$0" "$@"
fi
fusee bench --suite benchmarks/reference.toml "$@"
fusee bench failover --transport shm --out benchmarks/results/failover-shm
fusee bench failover --transport zmq --out benchmarks/results/failover-zmq
