#!/usr/bin/env bash
# Rerun every reference result under benchmarks/results/ on this machine (see reference.toml).
# Needs the bench extra: pip install -e '.[bench]'. The Redis baseline also needs redis-server
# (Debian/Ubuntu: apt-get install redis-server); without it that baseline is skipped.
# Extra arguments go to `fusee bench`, e.g. --no-progress. Then the MN-kill timelines.
set -euo pipefail
cd "$(dirname "$0")/.."
fusee bench --suite benchmarks/reference.toml "$@"
fusee bench failover --transport shm --out benchmarks/results/failover-shm
fusee bench failover --transport zmq --out benchmarks/results/failover-zmq
