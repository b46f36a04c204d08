#!/usr/bin/env bash
# Issue 12's targets, one line each: the `fusee bench` run that measures it, then
# `python3 -m fusee.bench.targets`, which prints each figure next to its target (met / MISSED).
# Run it on a quiet machine (every process shares the cores):
#   benchmarks/issue12.sh [--build compiled|source] [OUT]
# --build: which build of this checkout's code it measures (benchmarks/with_build.sh): compiled
# (the default: what `pip install fusee` runs, the fast path compiled by mypyc) or source (the
# .py files, as an editable install runs them). Never whichever one `pip install -e` named.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=compiled
if [ "${1:-}" = --build ]; then BUILD=${2:-}; shift 2 || true; fi
if [ -z "${FUSEE_ISSUE12_BUILD:-}" ]; then
  FUSEE_ISSUE12_BUILD=$BUILD exec benchmarks/with_build.sh "$BUILD" "$0" "$@"
fi
OUT=${1:-fusee-issue12}
B="fusee bench --no-baselines --no-progress --clients 1"
T="python3 -m fusee.bench.targets"
# p50 SEARCH <= 5 us, UPDATE/DELETE <= 12 us, INSERT <= 15 us (shm, 3 MNs, r=3, 1 KB, one client); load >= 60 Kops/s per client process
$B micro --load-clients 1 --out "$OUT/micro" > /dev/null && $T "$OUT/micro"
# YCSB-C at depth 8 on shm >= 150 Kops/s, and depth 8 never slower than depth 1 on shm
$B ycsb --workloads C --depth 1 --out "$OUT/c-shm-1" > /dev/null && $B ycsb --workloads C --depth 8 --out "$OUT/c-shm-8" > /dev/null && $T "$OUT/c-shm-1" "$OUT/c-shm-8"
# on zmq (ipc), depth 8 >= 4x depth 1
$B ycsb --transport zmq --workloads C --depth 1 --out "$OUT/c-zmq-1" > /dev/null && $B ycsb --transport zmq --workloads C --depth 8 --out "$OUT/c-zmq-8" > /dev/null && $T "$OUT/c-zmq-1" "$OUT/c-zmq-8"
# zmq (ipc): a SEARCH of one round trip within 1.5x of the raw pyzmq ping-pong of the same run
$B micro --transport zmq --keys 10000 --micro-ops search --out "$OUT/micro-zmq" > /dev/null && $T "$OUT/micro-zmq"
# client instructions per operation (callgrind: no clock, so a loaded machine measures them too),
# each operation alone, then SEARCH with 8 in flight on shm and on zmq (the cost of depth)
I="python3 benchmarks/instructions.py"
$I insert
$I update
$I search
$I delete
$I search --depth 8
$I search --transport zmq
$I search --transport zmq --depth 8
