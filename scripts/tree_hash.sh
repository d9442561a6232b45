#!/usr/bin/env bash
# One hash of the code a run measures: the package, scripts and pyproject.toml as they are in
# the working tree (a device machine's copy of the tree may carry stale git metadata, so its
# `git log` cannot say which commit ran). With a commit argument, the same hash of that commit.
#   bash scripts/tree_hash.sh            # working tree
#   bash scripts/tree_hash.sh 3e32e0d    # a commit, to match against a run's tree.txt
set -euo pipefail
if [ $# -gt 0 ]; then
  d=$(mktemp -d)
  trap 'rm -rf "$d"' EXIT
  git archive "$1" batchbench scripts pyproject.toml | tar -x -C "$d"
  cd "$d"
fi
find batchbench scripts pyproject.toml -type f \( -name '*.py' -o -name '*.h' -o -name '*.sh' -o -name '*.toml' \) \
  -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs md5sum | md5sum | cut -d' ' -f1
