#!/bin/sh
# ZooKeeper propagation latency: from a ZooKeeper create to the first hooked connect that lands on
# the new backend, beside a plain watch-and-reread client in the same run (examples/zkprop.rs).
# Everything runs in a private network namespace: ZooKeeper (Debian package) on 127.0.0.1:2181,
# `discotech serve` with a zookeeper source, and the prober under `discotech run`.
# Results go to docs/performance.md by hand.
#
#   benches/zk/run.sh                 # UPDATES=200; KEEP=1 keeps the logs
#
# Needs root (unshare) and the packages of tests/run.sh (zookeeper, default-jre-headless, dnsutils).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
UPDATES=${UPDATES:-200}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release

if [ "${ZKBENCH_INNER:-}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -q -p discotech -p discotech-hook --example zkctl --example zkprop --bin discotech --lib)
    exec env ZKBENCH_INNER=1 unshare --net --mount --propagation private -- "$0" "$@"
fi

ip link set lo up
WORK=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

cat >"$WORK/zoo.cfg" <<EOF
tickTime=500
dataDir=$WORK/zk
clientPort=2181
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=
EOF
java -Xmx512m -XX:+UseSerialGC -cp /usr/share/java/zookeeper.jar:/etc/zookeeper/conf \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zoo.cfg" >"$WORK/zk.log" 2>&1 &
PIDS="$PIDS $!"
"$TARGET/examples/zkctl" 127.0.0.1:2181 wait "create /bench/web/127.0.0.1:19001"

cat >"$WORK/discotech.toml" <<EOF
[dns]
listen = ["127.0.0.53:53"]
upstreams = []
[state]
dir = "$WORK/state"
[hook]
socket = "$WORK/hook.sock"
[[source]]
kind = "zookeeper"
hosts = ["127.0.0.1:2181"]
root = "/bench"
format = "host-port"
EOF
"$TARGET/discotech" serve --config "$WORK/discotech.toml" >"$WORK/discotech.log" 2>&1 &
PIDS="$PIDS $!"
i=0
MAGIC=""
while [ -z "$MAGIC" ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "discotech did not answer" >&2; cat "$WORK/discotech.log" >&2; exit 1; }
    sleep 0.1
    MAGIC=$(dig @127.0.0.53 +short +time=1 +tries=1 web.disco A 2>/dev/null || true)
done

"$TARGET/discotech" run --config "$WORK/discotech.toml" -- \
    "$TARGET/examples/zkprop" 127.0.0.1:2181 /bench/web "$MAGIC:80" 19001 19002 "$UPDATES"
