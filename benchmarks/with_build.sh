#!/usr/bin/env bash
# Run a command against one build of this checkout's client fast path, the one a figure is for:
#
#   benchmarks/with_build.sh compiled COMMAND [ARG...]   # what `pip install fusee` runs
#   benchmarks/with_build.sh source COMMAND [ARG...]     # the checkout's .py files
#
# compiled: a copy of the checkout (its working tree as it is, edits included) in a temporary
# folder, its fast path compiled there by mypyc as a wheel builds it (setup.py: about a minute
# on 2 cores), removed afterwards. Compiling the checkout itself in place would leave fusee/*.so
# beside the sources, and an edit would silently stop taking effect.
# source: the checkout itself; a fusee/*.so of an earlier in-place build would shadow its
# sources, so it refuses one.
# Either way COMMAND runs in the current folder with PYTHONPATH set to the tree it measures and
# PYTHONSAFEPATH=1: Python puts no script's folder or current folder ahead of it (run from the
# checkout, `python3 -m ...` would import the checkout's sources). `fusee bench` results name
# the build: machine.fast_path in results.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-}
if [ $# -lt 2 ] || { [ "$BUILD" != compiled ] && [ "$BUILD" != source ]; }; then
  echo "usage: benchmarks/with_build.sh compiled|source COMMAND [ARG...]" >&2
  exit 2
fi
shift
if [ "$BUILD" = source ]; then
  if compgen -G "$ROOT/fusee/*.so" >/dev/null; then
    echo "with_build.sh: $ROOT/fusee holds compiled modules (an in-place build), which would run" \
         "instead of the sources: rm $ROOT/fusee/*.so $ROOT/fusee__mypyc*.so" >&2
    exit 2
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  exec "$@"
fi
if ! python3 -c "import mypyc.build" 2>/dev/null; then
  echo "with_build.sh: the compiled build needs mypyc (pip install -e '.[lint]'), or measure" \
       "the source: benchmarks/with_build.sh source ..." >&2
  exit 2
fi
TREE=$(mktemp -d "${TMPDIR:-/tmp}/fusee-compiled.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
tar -C "$ROOT" -cf - --exclude=.git --exclude='*.so' --exclude=build --exclude=dist \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.hypothesis --exclude=.mypy_cache --exclude=benchmarks/results . |
  tar -C "$TREE" -xf -
# the commit `fusee bench` records (machine.fusee_commit) is the checkout's
GITDIR=$(git -C "$ROOT" rev-parse --absolute-git-dir 2>/dev/null) && echo "gitdir: $GITDIR" > "$TREE/.git"
echo "with_build.sh: compiling the fast path (mypyc) in $TREE ..." >&2
if ! (cd "$TREE" && python3 setup.py build_ext --inplace > build.log 2>&1); then
  tail -20 "$TREE/build.log" >&2
  echo "with_build.sh: the compiled build failed (its log is above)" >&2
  exit 1
fi
export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
python3 -c "import fusee.operations as o, sys; sys.exit(not o.__file__.endswith('.so'))" || {
  echo "with_build.sh: the compiled modules in $TREE do not import" >&2; exit 1; }
"$@"
