#!/usr/bin/env bash
# A 3-node kvtierd cluster on this machine, from deploy/cluster/cluster.toml:
# nodes a, b, c on 127.0.0.1:50061-50063 (metrics 9471-9473), data under
# ./kvtier-cluster/{a,b,c}, logs in ./kvtier-cluster/{a,b,c}.log.
#
#   ./scripts/cluster.sh start     # build, start the three nodes, wait until each sees the others up
#   ./scripts/cluster.sh status    # `kvtier cluster` on each node
#   ./scripts/cluster.sh stop      # SIGTERM each node (drains and seals)
#   ./scripts/cluster.sh kill b    # kill -9 one node (to try a failure)
#   ./scripts/cluster.sh restart b # start one node again on its data
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${KVTIER_CLUSTER_DIR:-$PWD/kvtier-cluster}
NODES=(a b c)
port() { case $1 in a) echo 1;; b) echo 2;; c) echo 3;; *) echo "unknown node $1" >&2; exit 2;; esac; }

start_node() {
  local id=$1 i
  i=$(port "$id")
  mkdir -p "$DIR/$id"
  KVTIER_CONFIG=deploy/cluster/cluster.toml KVTIER_CLUSTER_NODE_ID=$id \
  KVTIER_LISTEN=127.0.0.1:5006$i KVTIER_METRICS_LISTEN=127.0.0.1:947$i \
  KVTIER_DATA_DIR=$DIR/$id nohup ./target/release/kvtierd >"$DIR/$id.log" 2>&1 &
  echo $! >"$DIR/$id.pid"
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_up() {
  local id out
  for _ in $(seq 1 100); do
    local ok=1
    for id in "${NODES[@]}"; do
      running "$id" || continue
      out=$(./target/release/kvtier --endpoint "http://127.0.0.1:5006$(port "$id")" cluster 2>/dev/null) || { ok=0; break; }
      echo "$out" | python3 -c 'import json,sys; m=json.load(sys.stdin)["members"]; sys.exit(0 if all(x["liveness"]=="up" for x in m) else 1)' || { ok=0; break; }
    done
    [ $ok = 1 ] && return 0
    sleep 0.2
  done
  echo "cluster.sh: the nodes did not all come up; see $DIR/*.log" >&2
  return 1
}

case ${1:-} in
  start)
    ./scripts/setup.sh
    cargo build --release -q -p kvtier-server
    for id in "${NODES[@]}"; do
      running "$id" && { echo "node $id already runs (pid $(cat "$DIR/$id.pid"))"; continue; }
      start_node "$id"
    done
    wait_up
    echo "cluster up: endpoints http://127.0.0.1:50061 (a), :50062 (b), :50063 (c)"
    ;;
  status)
    for id in "${NODES[@]}"; do
      echo "== $id"; ./target/release/kvtier --endpoint "http://127.0.0.1:5006$(port "$id")" cluster || true
    done
    ;;
  stop)
    for id in "${NODES[@]}"; do
      running "$id" && kill -TERM "$(cat "$DIR/$id.pid")" || true
    done
    for id in "${NODES[@]}"; do
      while running "$id"; do sleep 0.1; done
      rm -f "$DIR/$id.pid"
    done
    echo "cluster stopped"
    ;;
  kill)
    id=${2:?which node}; port "$id" >/dev/null
    if running "$id"; then
      kill -KILL "$(cat "$DIR/$id.pid")"
      while running "$id"; do sleep 0.05; done
      echo "node $id killed"
    fi
    ;;
  restart)
    id=${2:?which node}; port "$id" >/dev/null
    running "$id" && { echo "node $id runs"; exit 0; }
    start_node "$id"; wait_up; echo "node $id back"
    ;;
  *)
    sed -n '2,11p' "$0"; exit 2;;
esac
