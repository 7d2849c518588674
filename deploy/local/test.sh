#!/usr/bin/env bash
# The test command: installs what is missing, checks the contract and the code style, builds,
# and runs every test against real PostgreSQL, etcd and ClickHouse (chdb) processes.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "dependencies"
bash deploy/local/install-deps.sh
export PATH="$repo/.tools/venv/bin:$PATH"

step "protobuf contract (buf lint$( [ -n "${BUF_BREAKING_AGAINST:-}" ] && echo ", buf breaking against $BUF_BREAKING_AGAINST"))"
buf lint
if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
  buf breaking --against "$BUF_BREAKING_AGAINST"
fi

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (the tests start the service binaries)"
cargo build --workspace --bins --locked

step "tests"
cargo nextest run --workspace --locked --no-fail-fast ${CI:+--profile ci}
