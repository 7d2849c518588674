#!/usr/bin/env bash
# The benchmark command: builds Ferry in release mode and measures the snapshot against
# baselines taken in the same run (raw parallel COPY, a psql | curl pipeline), printing a table.
# Arguments go to ferry-bench (e.g. --rows 1000000 --parallel 4).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
bash deploy/local/install-deps.sh
cargo build --release --locked --bins
export FERRY_PYTHON="$repo/.tools/venv/bin/python"
exec "${CARGO_TARGET_DIR:-$repo/target}/release/ferry-bench" "$@"
