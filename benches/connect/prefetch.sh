#!/bin/sh
# Connection prefetching across a real round trip. The backends (nginx, one worker, on
# 10.9.1.2:8080 and 10.9.1.3:8080) live in a second network namespace behind a delay line
# (tests/clients/delayline.c: two TUN devices, RTT_US/2 each way; this kernel has no netem), and
# the real daemon (release build) serves `web` over them with `prefetch`. Each round, interleaved,
# the same client runs plain (to a backend's address, no hook) and through the hook (to web's
# magic address, so it is handed a pooled connection):
#   - connect: N blocking connects GAP_MS apart, each then a GET read to the last byte
#     (tests/clients/prefetchclient.c): connect time and time to the last byte;
#   - wrk with "Connection: close" (a new connection per request), CONNS connections, DURATION.
# Prints the medians per round, then RESULT lines with the ratios of the medians over all rounds.
#
#   benches/connect/prefetch.sh     # ROUNDS=3 RTT_US=2000 N=200 GAP_MS=20 CONNS=4 DURATION=5s POOL=64
set -eu
if [ "${DISCOTECH_PREFETCH_INNER:-}" != 1 ]; then
    ROOT=$(cd "$(dirname "$0")/../.." && pwd)
    (cd "$ROOT" && cargo build --release -q -p discotech -p discotech-hook)
    OUT=${CARGO_TARGET_DIR:-$ROOT/target}/bench-clients
    mkdir -p "$OUT"
    cc -O2 -pthread -o "$OUT/delayline" "$ROOT/tests/clients/delayline.c"
    cc -O2 -o "$OUT/prefetchclient" "$ROOT/tests/clients/prefetchclient.c"
    exec unshare --net --mount --propagation private -- \
        env DISCOTECH_PREFETCH_INNER=1 ROOT="$ROOT" OUT="$OUT" sh "$0" "$@"
fi
ROUNDS=${ROUNDS:-3}
RTT_US=${RTT_US:-2000}
N=${N:-200}
GAP_MS=${GAP_MS:-20}
CONNS=${CONNS:-4}
DURATION=${DURATION:-5s}
POOL=${POOL:-64}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ip link set lo up
sysctl -q -w net.ipv4.tcp_tw_reuse=1
unshare --net sh -c 'ip link set lo up && sysctl -q -w net.ipv4.tcp_tw_reuse=1 && exec sleep 3600' &
PEER=$!
PIDS="$PIDS $PEER"
sleep 0.3
"$OUT/delayline" $((RTT_US / 2)) "$PEER" 3600 >"$WORK/delayline.log" 2>&1 &
PIDS="$PIDS $!"
sleep 0.3
grep -q ready "$WORK/delayline.log" || { cat "$WORK/delayline.log"; exit 1; }
ip addr add 10.9.0.1/32 dev dla
ip link set dla up
ip route add 10.9.1.0/24 dev dla src 10.9.0.1
nsenter -t "$PEER" -n sh -c 'ip addr add 10.9.1.2/32 dev dlb && ip addr add 10.9.1.3/32 dev dlb &&
    ip link set dlb up && ip route add 10.9.0.0/24 dev dlb'

mkdir -p "$WORK/nginx" "$WORK/zones" "$WORK/state" "$WORK/run"
chmod 700 "$WORK/state" "$WORK/run"
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx;
    proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx;
    uwsgi_temp_path $WORK/nginx;
    scgi_temp_path $WORK/nginx;
    server { listen 10.9.1.2:8080; location / { return 200 "a"; } }
    server { listen 10.9.1.3:8080; location / { return 200 "b"; } }
}
CONF
nsenter -t "$PEER" -n nginx -c "$WORK/nginx.conf" &
PIDS="$PIDS $!"

cat >"$WORK/discotech.toml" <<CONF
[dns]
listen = ["127.0.0.53:53"]
upstreams = []
[hook]
socket = "$WORK/run/hook.sock"
[admin]
socket = "$WORK/run/admin.sock"
[metrics]
listen = ["127.0.0.1:9253"]
[state]
dir = "$WORK/state"
[[source]]
kind = "file"
path = "$WORK/zones"
CONF
cat >"$WORK/zones/web.toml" <<CONF
[services.web]
lb = "round-robin"
backends = ["10.9.1.2:8080", "10.9.1.3:8080"]
prefetch = { pool = $POOL, max_idle = "5s" }
CONF
"$BIN/discotech" serve --config "$WORK/discotech.toml" >"$WORK/daemon.log" 2>&1 &
PIDS="$PIDS $!"
for _ in $(seq 50); do
    curl -sf --max-time 1 http://10.9.1.2:8080/ >/dev/null 2>&1 && [ -S "$WORK/run/hook.sock" ] && break
    sleep 0.1
done
MAGIC=$("$BIN/discotech" services --config "$WORK/discotech.toml" | awk '$1 == "web" { print $2 }')
[ -n "$MAGIC" ] || { cat "$WORK/daemon.log"; exit 1; }
sleep 1 # the pools fill
hooked() { "$BIN/discotech" run --config "$WORK/discotech.toml" -- "$@"; }

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# One connect run: writes the median connect µs and median last-byte µs.
connects() { awk '{ print $1 }' "$1" | median; awk '{ print $2 }' "$1" | median; }
wrk_rps() { awk '/^Requests\/sec:/ { printf "%d\n", $2 }' "$1"; }

echo "RTT ${RTT_US} µs (ping-free check: plain connect p50 below), pool $POOL, $ROUNDS rounds"
printf '%-6s %12s %12s %12s %12s %10s %10s\n' round conn_plain conn_pref ttlb_plain ttlb_pref wrk_plain wrk_pref
: >"$WORK/rounds"
for r in $(seq "$ROUNDS"); do
    "$OUT/prefetchclient" time 10.9.1.2 8080 "$N" "$GAP_MS" >"$WORK/plain.txt"
    hooked "$OUT/prefetchclient" time "$MAGIC" 8080 "$N" "$GAP_MS" >"$WORK/pref.txt"
    set -- $(connects "$WORK/plain.txt") $(connects "$WORK/pref.txt")
    cp_=$1 tp=$2 cf=$3 tf=$4
    wrk -t 1 -c "$CONNS" -d "$DURATION" -H "Connection: close" "http://10.9.1.2:8080/" >"$WORK/wrk-plain.txt" 2>&1
    hooked wrk -t 1 -c "$CONNS" -d "$DURATION" -H "Connection: close" "http://$MAGIC:8080/" >"$WORK/wrk-pref.txt" 2>&1
    wp=$(wrk_rps "$WORK/wrk-plain.txt")
    wf=$(wrk_rps "$WORK/wrk-pref.txt")
    printf '%-6s %12s %12s %12s %12s %10s %10s\n' "$r" "$cp_" "$cf" "$tp" "$tf" "$wp" "$wf"
    echo "$cp_ $cf $tp $tf $wp $wf" >>"$WORK/rounds"
done
col() { awk -v c="$1" '{ print $c }' "$WORK/rounds" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
echo "RESULT name=prefetch_connect rtt_us=$RTT_US plain_p50_us=$(col 1) prefetch_p50_us=$(col 2) ratio=$(ratio "$(col 2)" "$(col 1)") goal=0.1"
echo "RESULT name=prefetch_http_close_ttlb rtt_us=$RTT_US plain_p50_us=$(col 3) prefetch_p50_us=$(col 4) ratio=$(ratio "$(col 4)" "$(col 3)") goal=0.6"
echo "RESULT name=prefetch_wrk_close rtt_us=$RTT_US direct_rps=$(col 5) prefetch_rps=$(col 6) ratio=$(ratio "$(col 6)" "$(col 5)") goal=1.5"
curl -s http://127.0.0.1:9253/metrics | grep '^discotech_prefetch' || true
"$BIN/discotech" backends --config "$WORK/discotech.toml" web || true
