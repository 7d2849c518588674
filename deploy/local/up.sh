#!/usr/bin/env bash
# The run command: installs what is missing, builds Ferry, starts the whole local stack on
# loopback (PostgreSQL with wal_level=logical, etcd, ClickHouse via chdb, the coordinator and
# both workers), creates a demo table and a demo pipe, and leaves everything running.
# State and logs: $FERRY_STATE_DIR (default /tmp/ferry-local). Stop with deploy/local/down.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
# shellcheck source=deploy/local/stack.env
source deploy/local/stack.env
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

bash deploy/local/install-deps.sh
step "building Ferry"
cargo build --bins --quiet
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
py="$repo/.tools/venv/bin/python"
grpcurl="$repo/.tools/venv/bin/grpcurl"
mkdir -p "$FERRY_STATE_DIR"/{logs,pids}
chmod 755 "$FERRY_STATE_DIR"

# Alive and not a zombie (a killed child of an exited shell may linger unreaped in containers).
running() {
  local pid
  pid=$(cat "$FERRY_STATE_DIR/pids/$1" 2>/dev/null) || return 1
  [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not become ready in ${secs}s; see $FERRY_STATE_DIR/logs"
}
start() { # name, port, command... (runs in its own session so the shell's exit does not stop it)
  local name=$1 port=$2; shift 2
  if running "$name"; then echo "    $name already running"; return; fi
  port_free "$port" || die "port $port for $name is taken; set FERRY_*_PORT (see deploy/local/stack.env)"
  setsid nohup "$@" >>"$FERRY_STATE_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$FERRY_STATE_DIR/pids/$name"
}

step "PostgreSQL 15 on 127.0.0.1:$FERRY_PG_PORT"
pgdata="$FERRY_STATE_DIR/postgres"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then as_pg=(runuser -u postgres --); fi
if [ ! -f "$pgdata/PG_VERSION" ]; then
  mkdir -p "$pgdata"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pgdata"
  "${as_pg[@]}" /usr/lib/postgresql/15/bin/initdb -D "$pgdata" --auth=trust --username=postgres \
    --encoding=UTF8 >"$FERRY_STATE_DIR/logs/initdb.log"
fi
if ! "${as_pg[@]}" /usr/lib/postgresql/15/bin/pg_ctl -D "$pgdata" status >/dev/null 2>&1; then
  port_free "$FERRY_PG_PORT" || die "port $FERRY_PG_PORT is taken; set FERRY_PG_PORT"
  "${as_pg[@]}" /usr/lib/postgresql/15/bin/pg_ctl -D "$pgdata" -w -l "$pgdata/server.log" \
    -o "-p $FERRY_PG_PORT -k $pgdata -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20" \
    start >/dev/null
fi
psql_() { psql -h 127.0.0.1 -p "$FERRY_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
wait_for postgres 30 psql_ -c 'select 1'

step "etcd on 127.0.0.1:$FERRY_ETCD_PORT"
start etcd "$FERRY_ETCD_PORT" etcd --name local --data-dir "$FERRY_STATE_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$FERRY_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$FERRY_ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$FERRY_ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$FERRY_ETCD_PEER_PORT" \
  --initial-cluster "local=http://127.0.0.1:$FERRY_ETCD_PEER_PORT"
wait_for etcd 30 env ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$FERRY_ETCD_PORT" endpoint health

step "ClickHouse (chdb engine) on http://127.0.0.1:$FERRY_CH_PORT"
start clickhouse "$FERRY_CH_PORT" "$py" "$repo/deploy/local/chdb_server.py" --host 127.0.0.1 \
  --port "$FERRY_CH_PORT" --data-dir "$FERRY_STATE_DIR/clickhouse"
wait_for clickhouse 90 curl -sf "http://127.0.0.1:$FERRY_CH_PORT/ping"

step "Ferry services"
key="$FERRY_STATE_DIR/secret.key"
if [ ! -f "$key" ]; then (umask 077; head -c 32 /dev/urandom | base64 >"$key"); fi
export FERRY_ETCD_ENDPOINTS="http://127.0.0.1:$FERRY_ETCD_PORT"
start coordinator "$FERRY_COORDINATOR_PORT" "$bin/ferry-coordinator" --listen "127.0.0.1:$FERRY_COORDINATOR_PORT" \
  --secret-key-file "$key" --coordinator-id local-coordinator
start snapshot-worker "$FERRY_SNAPSHOT_WORKER_PORT" "$bin/ferry-snapshot-worker" \
  --listen "127.0.0.1:$FERRY_SNAPSHOT_WORKER_PORT" --worker-id local-snapshot --secret-key-file "$key"
start cdc-worker "$FERRY_CDC_WORKER_PORT" "$bin/ferry-cdc-worker" \
  --listen "127.0.0.1:$FERRY_CDC_WORKER_PORT" --worker-id local-cdc --secret-key-file "$key"
for port in "$FERRY_COORDINATOR_PORT" "$FERRY_SNAPSHOT_WORKER_PORT" "$FERRY_CDC_WORKER_PORT"; do
  wait_for "service on $port" 30 sh -c "'$grpcurl' -plaintext 127.0.0.1:$port grpc.health.v1.Health/Check | grep -q '\"SERVING\"'"
done

step "demo: table public.orders in database demo, pipe 'demo'"
psql_ -d postgres -c "select 1 from pg_database where datname = 'demo'" | grep -q 1 || psql_ -c 'create database demo'
psql_ -d demo <<'SQL'
set client_min_messages = warning;
create table if not exists orders (
  id bigint primary key, customer text not null, amount numeric(12,2), created_at timestamptz default now());
insert into orders (id, customer, amount)
  select i, 'customer ' || (i % 97), (i * 7 % 10000) / 100.0 from generate_series(1::bigint, 10000) as i
  on conflict do nothing;
SQL
export FERRY_ADDR="http://127.0.0.1:$FERRY_COORDINATOR_PORT"
if ! "$bin/ferry" get demo >/dev/null 2>&1; then
  "$bin/ferry" create demo --table public.orders \
    --source-host 127.0.0.1 --source-port "$FERRY_PG_PORT" --source-database demo --source-user postgres \
    --clickhouse-url "http://127.0.0.1:$FERRY_CH_PORT" --clickhouse-database demo --sync-interval 5 >/dev/null
fi
wait_for "pipe demo's snapshot" 120 sh -c "'$bin/ferry' get demo | grep -qE '^state +(running|completed|failed)'"
"$bin/ferry" get demo
step "rows in ClickHouse (demo.orders_current: the table as it is in Postgres)"
ch_query() { curl -sf --data-binary "$1" "http://127.0.0.1:$FERRY_CH_PORT/?default_format=PrettyCompactMonoBlock"; }
ch_query "SELECT count() AS rows, sum(amount) AS total_amount FROM demo.orders_current"
ch_query "SELECT id, customer, amount, created_at FROM demo.orders_current ORDER BY id LIMIT 3"

cat <<EOT

Ferry's local stack is running (state and logs in $FERRY_STATE_DIR):
  postgres     psql -h 127.0.0.1 -p $FERRY_PG_PORT -U postgres demo
  etcd         ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:$FERRY_ETCD_PORT get --prefix /ferry --keys-only
  clickhouse   curl 'http://127.0.0.1:$FERRY_CH_PORT/?query=SHOW+DATABASES'
  coordinator  127.0.0.1:$FERRY_COORDINATOR_PORT   (workers: $FERRY_SNAPSHOT_WORKER_PORT snapshot, $FERRY_CDC_WORKER_PORT cdc)

  export FERRY_ADDR=$FERRY_ADDR
  $bin/ferry list
  $bin/ferry watch demo
  $grpcurl -plaintext 127.0.0.1:$FERRY_COORDINATOR_PORT list

The demo pipe copied public.orders into ClickHouse and now streams its changes (every 5 s):
  psql -h 127.0.0.1 -p $FERRY_PG_PORT -U postgres demo -c "UPDATE orders SET amount = amount + 1 WHERE id <= 10"
  curl --data-binary "SELECT id, amount FROM demo.orders_current WHERE id <= 10 ORDER BY id" http://127.0.0.1:$FERRY_CH_PORT/
  $bin/ferry verify demo
Stop everything with deploy/local/down.sh.
EOT
