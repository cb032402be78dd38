#!/bin/sh
# End to end: wrk against nginx (1 worker) directly, through the connect hook (wrk preloaded,
# connecting to a magic address; the daemon picks nginx), and through a local HAProxy, with
# keep-alive and with "Connection: close". Interleaved rounds, median requests/s per case.
# Runs in a private network namespace (loopback only; tcp_tw_reuse set there, not on the host).
#
#   benches/connect/wrk.sh            # ROUNDS=3 DURATION=5s CONNS=50 PORT=18080
#
# nginx, HAProxy and the daemon (hook/examples/bench_daemon.rs) on CPU 0, wrk on CPU 1.
# With VIA=catch (benches/connect/catch.sh) the middle case is the daemon's BPF catch path instead:
# wrk is not hooked and connects to web's magic address; the real daemon (release build) runs.
set -eu
VIA=${VIA:-hook}
case $VIA in hook | catch) ;; *) echo "VIA is hook or catch" >&2; exit 2 ;; esac
if [ "${DISCOTECH_WRK_INNER:-}" != 1 ]; then
    ROOT=$(cd "$(dirname "$0")/../.." && pwd)
    if [ "$VIA" = hook ]; then
        (cd "$ROOT" && cargo build --release -q -p discotech-hook --lib --example bench_daemon)
    else
        (cd "$ROOT" && cargo build --release -q -p discotech)
    fi
    exec unshare --net --mount --propagation private -- env DISCOTECH_WRK_INNER=1 ROOT="$ROOT" sh "$0" "$@"
fi
ip link set lo up
sysctl -q -w net.ipv4.tcp_tw_reuse=1
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
PORT=${PORT:-18080}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
LIB="$TARGET/libdiscotech_hook.so"
WORK=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
user root;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/body;
    proxy_temp_path $WORK/proxy;
    fastcgi_temp_path $WORK/fastcgi;
    uwsgi_temp_path $WORK/uwsgi;
    scgi_temp_path $WORK/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.2:$PORT;
        location / { return 200 "ok\n"; }
    }
}
CONF
cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend f
    bind 127.0.0.3:$PORT
    default_backend b
backend b
    server s1 127.0.0.2:$PORT
CONF
taskset -c 0 nginx -c "$WORK/nginx.conf" &
PIDS="$PIDS $!"
taskset -c 0 haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS="$PIDS $!"
if [ "$VIA" = hook ]; then
    SOCK="$WORK/hook.sock"
    taskset -c 0 "$TARGET/examples/bench_daemon" "$SOCK" 127.77.0.9 round-robin "127.0.0.2:$PORT" >"$WORK/daemon.log" 2>&1 &
else
    SOCK="$WORK/run/admin.sock"
    mkdir -p "$WORK/zones" "$WORK/state" "$WORK/run"
    chmod 700 "$WORK/state" "$WORK/run"
    cat >"$WORK/discotech.toml" <<CONF
[dns]
listen = ["127.0.0.53:53"]
upstreams = []
[hook]
socket = "$WORK/run/hook.sock"
[admin]
socket = "$WORK/run/admin.sock"
[metrics]
listen = []
[state]
dir = "$WORK/state"
[[source]]
kind = "file"
path = "$WORK/zones"
CONF
    printf '[services.web]\nbackends = ["127.0.0.2:%s"]\n' "$PORT" >"$WORK/zones/web.toml"
    taskset -c 0 "$TARGET/discotech" serve --config "$WORK/discotech.toml" >"$WORK/daemon.log" 2>&1 &
fi
PIDS="$PIDS $!"
i=0
until [ -S "$SOCK" ] && curl -fs "http://127.0.0.2:$PORT/" >/dev/null && curl -fs "http://127.0.0.3:$PORT/" >/dev/null; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "servers did not start" >&2; cat "$WORK"/*.log "$WORK/nginx.err" >&2; exit 1; }
    sleep 0.1
done
if [ "$VIA" = catch ]; then
    MAGIC=$("$TARGET/discotech" services --config "$WORK/discotech.toml" | awk '$1 == "web" { print $2 }')
    "$TARGET/discotech" status --config "$WORK/discotech.toml" | grep -q "catch: on" ||
        { echo "the catch path is off:" >&2; "$TARGET/discotech" status --config "$WORK/discotech.toml" >&2; exit 1; }
    curl -fs "http://$MAGIC:$PORT/" >/dev/null || { echo "no answer through the catch path" >&2; exit 1; }
fi

run() { # CASE MODE URL [env...]
    case=$1 mode=$2 url=$3; shift 3
    if [ "$mode" = close ]; then hdr="Connection: close"; else hdr="X-Keep: alive"; fi
    rps=$(env "$@" taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" -H "$hdr" "$url" | awk '/^Requests\/sec/ { print $2 }')
    echo "$case $mode $rps" | tee -a "$WORK/results"
}
. "$ROOT/benches/connect/quiet.sh"
echo "rounds=$ROUNDS duration=$DURATION conns=$CONNS kernel=$(uname -r)"
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    quiet
    # The order rotates every round, so no case always runs first.
    case $((r % 3)) in
        0) order="direct $VIA haproxy" ;;
        1) order="$VIA haproxy direct" ;;
        *) order="haproxy direct $VIA" ;;
    esac
    for mode in keepalive close; do
        for c in $order; do
            case $c in
                direct) run direct "$mode" "http://127.0.0.2:$PORT/" X=1 ;;
                hook) run hook "$mode" "http://127.77.0.9:$PORT/" LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock" ;;
                catch) run catch "$mode" "http://$MAGIC:$PORT/" X=1 ;;
                haproxy) run haproxy "$mode" "http://127.0.0.3:$PORT/" X=1 ;;
            esac
        done
    done
done
awk -v via="$VIA" '
{ v[$1, $2, ++n[$1, $2]] = $3 }
function med(c, m,   k, i, j, t, a) {
    k = n[c, m]
    for (i = 1; i <= k; i++) a[i] = v[c, m, i]
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
END {
    for (mi = 1; mi <= 2; mi++) {
        m = (mi == 1) ? "keepalive" : "close"
        d = med("direct", m); h = med(via, m); p = med("haproxy", m)
        printf "%-9s direct %9.0f  %s %9.0f (%.3fx direct)  haproxy %9.0f  (%s/haproxy %.2fx)\n", m, d, via, h, h / d, p, via, h / p
    }
}' "$WORK/results"
