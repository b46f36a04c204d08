#!/usr/bin/env bash
# Rerun every reference result under benchmarks/results/ on this machine (see reference.toml).
# Needs the bench extra: pip install -e '.[bench]'. The Redis baseline also needs redis-server
# (Debian/Ubuntu: apt-get install redis-server); without it that baseline is skipped.
# Extra arguments go to `fusee bench`, e.g. --no-progress.
set -euo pipefail
cd "$(dirname "$0")/.."
exec fusee bench --suite benchmarks/reference.toml "$@"
