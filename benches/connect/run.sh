#!/bin/sh
# Connect hook micro-benchmark: socket+connect+close cycles against a loopback backend, three
# ways, interleaved (plain, hooked to a magic address, hooked to a non-magic address; then non-blocking
# plain and magic, and UDP) for
# ROUNDS rounds, then the median of each figure. Results go to docs/performance.md by hand.
#
#   benches/connect/run.sh            # ROUNDS=5 WARMUP=2000 ITERS=50000 PORT=18765 LB=round-robin
#
# The backend and the daemon (hook/examples/bench_daemon.rs: the hook server `discotech serve`
# runs, with one service) are pinned to CPU 0, the client to CPU 1. Loopback only.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-2000}
ITERS=${ITERS:-50000}
PORT=${PORT:-18765}
LB=${LB:-round-robin}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

(cd "$ROOT" && cargo build --release -q -p discotech-hook --lib --example bench_daemon)
cc -O2 -o "$WORK/connect_bench" "$ROOT/benches/connect/connect_bench.c"
LIB="$TARGET/libdiscotech_hook.so"

taskset -c 0 "$WORK/connect_bench" --serve 127.0.0.2 "$PORT" >"$WORK/backend.log" 2>&1 &
PIDS="$PIDS $!"
taskset -c 0 "$TARGET/examples/bench_daemon" "$WORK/hook.sock" 127.77.0.9 "$LB" "127.0.0.2:$PORT" >"$WORK/daemon.log" 2>&1 &
PIDS="$PIDS $!"
i=0
while [ ! -S "$WORK/hook.sock" ] || ! grep -q listening "$WORK/backend.log"; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "daemon or backend did not start" >&2; cat "$WORK"/*.log >&2; exit 1; }
    sleep 0.1
done

bench() { # NAME [env...]; HOST, BPORT and UDP (empty or --udp) from the environment
    name=$1; shift
    line=$(env "$@" taskset -c 1 "$WORK/connect_bench" $UDP "$HOST" "$BPORT" "$WARMUP" "$ITERS")
    echo "$name $line" | tee -a "$WORK/results"
}
. "$ROOT/benches/connect/quiet.sh"
echo "rounds=$ROUNDS warmup=$WARMUP iters=$ITERS lb=$LB kernel=$(uname -r) cpus=$(nproc)"
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    quiet
    UDP= HOST=127.0.0.2 BPORT=$PORT bench plain X=1
    UDP= HOST=127.77.0.9 BPORT=80 bench magic LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock"
    UDP= HOST=127.0.0.2 BPORT=$PORT bench nonmagic LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock"
    # Non-blocking, as curl, nginx, Node and Java NIO connect: the hook also reports the connect
    # under way, and the daemon follows it in the socket table.
    UDP=--nonblock HOST=127.0.0.2 BPORT=$PORT bench nb-plain X=1
    UDP=--nonblock HOST=127.77.0.9 BPORT=80 bench nb-magic LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock"
    # UDP connects send nothing: a short, steady cycle that shows the passthrough cost.
    UDP=--udp HOST=127.0.0.2 BPORT=$PORT bench udp-plain X=1
    UDP=--udp HOST=127.0.0.2 BPORT=$PORT bench udp-hooked LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock"
done

# The passthrough check alone: connect(-1, non-magic) fails with EBADF at once, so the mean per
# call shows the hook's address check without network noise.
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    echo "pass-plain $(taskset -c 1 "$WORK/connect_bench" --passthrough 127.0.0.2 "$PORT" 2000000)" | tee -a "$WORK/pass"
    echo "pass-hooked $(env LD_PRELOAD="$LIB" DISCOTECH_SOCKET="$WORK/hook.sock" taskset -c 1 "$WORK/connect_bench" --passthrough 127.0.0.2 "$PORT" 2000000)" | tee -a "$WORK/pass"
done

# Medians over rounds, and ratios to plain.
awk '
function med(name, key,   n, i, j, t, a) {
    n = 0
    for (i = 1; i <= cnt[name]; i++) a[++n] = v[name, key, i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    name = $1; cnt[name]++
    for (f = 2; f <= NF; f++) { split($f, kv, "="); v[name, kv[1], cnt[name]] = kv[2] }
}
END {
    printf "%-10s %8s %8s %8s %8s %10s %10s\n", "mode", "p50_us", "p90_us", "p99_us", "mean_us", "p50/base", "p99/base"
    split("plain magic nonmagic nb-plain nb-magic udp-plain udp-hooked", order, " ")
    for (o = 1; o <= 7; o++) {
        m = order[o]; base = (m ~ /^udp/) ? "udp-plain" : (m ~ /^nb/) ? "nb-plain" : "plain"
        printf "%-10s %8.2f %8.2f %8.2f %8.2f %10.2f %10.2f\n", m, med(m, "p50_us"), med(m, "p90_us"), med(m, "p99_us"), med(m, "mean_us"), med(m, "p50_us") / med(base, "p50_us"), med(m, "p99_us") / med(base, "p99_us")
    }
    printf "passthrough overhead at p50: TCP %.2f us, UDP %.3f us\n", med("nonmagic", "p50_us") - med("plain", "p50_us"), med("udp-hooked", "p50_us") - med("udp-plain", "p50_us")
}' "$WORK/results"
awk '{ split($2, kv, "="); v[$1, ++n[$1]] = kv[2] }
function med(name,   i, j, t, a, k) {
    k = n[name]
    for (i = 1; i <= k; i++) a[i] = v[name, i]
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
END { printf "connect(-1, non-magic): plain %.1f ns, hooked %.1f ns, passthrough cost %.1f ns\n", med("pass-plain"), med("pass-hooked"), med("pass-hooked") - med("pass-plain") }' "$WORK/pass"
