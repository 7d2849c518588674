#!/usr/bin/env bash
# Stops the local stack started by deploy/local/up.sh. Its data stays in $FERRY_STATE_DIR;
# pass --purge to delete it too.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/local/stack.env
source "$repo/deploy/local/stack.env"
# Services first (SIGTERM: the coordinator resigns, workers deregister), then the servers.
for name in cdc-worker snapshot-worker coordinator clickhouse etcd; do
  pidfile="$FERRY_STATE_DIR/pids/$name"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $name"
  fi
  rm -f "$pidfile"
done
pgdata="$FERRY_STATE_DIR/postgres"
if [ -f "$pgdata/postmaster.pid" ]; then
  as_pg=()
  if [ "$(id -u)" -eq 0 ]; then as_pg=(runuser -u postgres --); fi
  "${as_pg[@]}" /usr/lib/postgresql/15/bin/pg_ctl -D "$pgdata" -m fast stop >/dev/null && echo "stopped postgres"
fi
if [ "${1:-}" = "--purge" ]; then rm -rf "$FERRY_STATE_DIR"; echo "removed $FERRY_STATE_DIR"; fi
