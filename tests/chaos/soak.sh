#!/usr/bin/env bash
# Soak: dnsperf at a steady QPS for a long while on a mix of service names and forwarded names;
# nothing may be lost, and the daemon's resident memory may not grow after warm-up.
#
#   BIN_DIR=target/release tests/chaos/soak.sh                 # full length: 20k QPS for 600 s (~11 min)
#   DURATION=20 QPS=2000 WARMUP=5 CHECK_RSS=0 tests/chaos/soak.sh   # short form (~30 s)
#
# Inside a private network + mount namespace (see lib.sh): dnsmasq on 127.0.0.2:53 answers every
# name under up.test (10.2.3.4, TTL UPSTREAM_TTL); discotech on 127.0.0.53 serves SERVICES services
# (two backends each, one zone file) and forwards to dnsmasq. The query file mixes, line by line:
# SERVICE_PCT% service questions (A, AAAA and SRV of svcN.disco), WARM_PCT% forwarded names from a
# set of WARM_NAMES (answered from the cache, refreshed when their TTL runs out), and the rest unique
# forwarded names (each one a cache miss, an upstream query and a new cache entry, so the cache
# stays full and churns). dnsperf sends QPS queries a second for DURATION s
# (-Q, 8 clients, 1000 outstanding, 5 s timeout). The daemon's VmRSS, descriptors and threads are
# sampled every SAMPLE s; growth = (largest RSS after WARMUP s - RSS at WARMUP s) / RSS at WARMUP s.
# Use a release build for 20k QPS (a debug daemon falls behind: the RESULT shows the achieved QPS).
#
# Env (defaults): QPS=20000 DURATION=600 WARMUP=60 SAMPLE=10 SERVICES=1000 WARM_NAMES=1000
#   SERVICE_PCT=50 WARM_PCT=40 UPSTREAM_TTL=30 MAX_GROWTH_PCT=5 CHECK_RSS=1 LINES=1000000, plus lib.sh's.
#   DAEMON_CPU, PERF_CPU: pin the daemon / dnsperf to these CPUs (taskset), e.g. 0 and 1; unset: no pinning.
#   DAEMON_RCVBUF=BYTES: an experiment: the daemon's UDP sockets get this SO_RCVBUF (rcvbuf.c, preloaded
#   into the daemon; capped by net.core.rmem_max). Unset: the daemon's own (the kernel default).
# Needs root, dig, dnsperf, dnsmasq (dnsmasq-base), the daemon built.
#
# Last line: RESULT name=soak qps=N duration_s=N queries=N lost=N noerror=N servfail=N achieved_qps=N
#   rss_warm_kb=N rss_max_kb=N rss_end_kb=N growth_pct=N fds_warm=N fds_end=N threads_end=N
#   daemon_socket_drops=N udp_rcvbuf_errors=N (where lost queries were dropped; see below)
# The goal: lost=0 servfail=0 and growth_pct < MAX_GROWTH_PCT (when CHECK_RSS=1); exit status 1 otherwise.
set -eu
CHAOS_NAME=soak
. "$(dirname "$0")/lib.sh"

QPS=${QPS:-20000}
DURATION=${DURATION:-600}
WARMUP=${WARMUP:-60}
SAMPLE=${SAMPLE:-10}
SERVICES=${SERVICES:-1000}
WARM_NAMES=${WARM_NAMES:-1000}
SERVICE_PCT=${SERVICE_PCT:-50}
WARM_PCT=${WARM_PCT:-40}
UPSTREAM_TTL=${UPSTREAM_TTL:-30}
MAX_GROWTH_PCT=${MAX_GROWTH_PCT:-5}
CHECK_RSS=${CHECK_RSS:-1}

chaos_enter "$@"
need dig dnsperf dnsmasq
need_binaries

dnsmasq_upstream 127.0.0.2 "$UPSTREAM_TTL" --address=/up.test/10.2.3.4
until [ -n "$(dig @127.0.0.2 +short +time=1 +tries=1 probe.up.test 2>/dev/null)" ]; do
    kill -0 "$UPSTREAM_PID" || die "dnsmasq did not start: $(cat "$WORK/dnsmasq.log")"
    sleep 0.05
done
awk -v n="$SERVICES" 'BEGIN {
    for (i = 0; i < n; i++)
        printf "[services.svc%d]\nbackends = [\"127.3.%d.%d:80\", \"127.4.%d.%d:80\"]\n\n", i, i / 250, i % 250 + 1, i / 250, i % 250 + 1
}' >"$WORK/zones/soak.toml"
write_config 'upstreams = ["127.0.0.2:53"]' ''
wrap=()
[ -z "${DAEMON_CPU:-}" ] || wrap+=(taskset -c "$DAEMON_CPU")
if [ -n "${DAEMON_RCVBUF:-}" ]; then
    cc -O2 -shared -fPIC -o "$WORK/rcvbuf.so" "$CHAOS_DIR/rcvbuf.c" -ldl || die "cannot build rcvbuf.so"
    wrap+=(env RCVBUF_BYTES="$DAEMON_RCVBUF" LD_PRELOAD="$WORK/rcvbuf.so")
fi
start_daemon "${wrap[@]}"
# The daemon's listening sockets' receive buffer (ss -m: rb), as the kernel has it.
rcvbuf_bytes=$(ss -uamn 'src 127.0.0.53:53' 2>/dev/null | grep -o 'rb[0-9]*' | sort -u | tr -d rb | tr '\n' ',' | sed 's/,$//')
[ -n "$(magic "svc$((SERVICES - 1)).disco")" ] || die "the zone did not load"

# The query file, at most LINES lines (dnsperf starts over at the end): with the default mix a million
# lines hold 100,000 unique names, ten times the cache, so a name asked again on the next pass has
# long been evicted and is a miss again.
lines=$((QPS * DURATION + 1000))
[ "$lines" -le "${LINES:-1000000}" ] || lines=${LINES:-1000000}
awk -v lines="$lines" -v svcs="$SERVICES" -v warm="$WARM_NAMES" -v sp="$SERVICE_PCT" -v wp="$WARM_PCT" 'BEGIN {
    srand(1); split("A AAAA SRV", t, " ")
    for (i = 0; i < lines; i++) {
        r = rand() * 100
        if (r < sp) printf "svc%d.disco %s\n", int(rand() * svcs), t[int(rand() * 3) + 1]
        else if (r < sp + wp) printf "warm-%d.up.test A\n", int(rand() * warm)
        else printf "cold-%d.up.test A\n", i
    }
}' >"$WORK/queries"

log "dnsperf at $QPS QPS for ${DURATION}s"
t0=$(now_ms)
${PERF_CPU:+taskset -c "$PERF_CPU"} dnsperf -s 127.0.0.53 -d "$WORK/queries" -l "$DURATION" -Q "$QPS" -c 8 -q 1000 -t 5 \
    >"$WORK/dnsperf.out" 2>&1 &
PERF=$!
track $PERF
# Where lost queries went: drops at the daemon's listening socket (its receive queue was full: the
# daemon did not read fast enough), and UDP receive-buffer errors of the whole namespace (those plus
# dnsperf's and dnsmasq's own sockets).
daemon_drops() { awk '$2 == "3500007F:0035" { d += $13 } END { print d + 0 }' /proc/net/udp; }
rcvbuf_errors() { awk '/^Udp:/ { if (h) { print $6; exit } h = 1 }' /proc/net/snmp; }
rcvbuf0=$(rcvbuf_errors)
echo "t_s rss_kb fds threads daemon_socket_drops udp_rcvbuf_errors" >"$WORK/samples"
rss_warm=""
fds_warm=""
rss_max=0
while kill -0 "$PERF" 2>/dev/null; do
    t=$((($(now_ms) - t0) / 1000))
    rss=$(rss_kb "$DPID")
    fds=$(ls "/proc/$DPID/fd" | wc -l)
    threads=$(ls "/proc/$DPID/task" | wc -l)
    echo "$t $rss $fds $threads $(daemon_drops) $(($(rcvbuf_errors) - rcvbuf0))" >>"$WORK/samples"
    if [ "$t" -ge "$WARMUP" ]; then
        if [ -z "$rss_warm" ]; then
            rss_warm=$rss
            fds_warm=$fds
        fi
        [ "$rss" -gt "$rss_max" ] && rss_max=$rss
    fi
    sleep "$SAMPLE"
done
wait "$PERF" || true
curl -s --max-time 5 http://127.0.0.1:9253/metrics >"$WORK/metrics" 2>/dev/null || true
drops=$(daemon_drops)
rcvbuf=$(($(rcvbuf_errors) - rcvbuf0))
rss_end=$(rss_kb "$DPID")
fds_end=$(ls "/proc/$DPID/fd" | wc -l)
threads_end=$(ls "/proc/$DPID/task" | wc -l)
[ -n "$rss_warm" ] || { rss_warm=$rss_end; fds_warm=$fds_end; }
[ "$rss_end" -gt "$rss_max" ] && rss_max=$rss_end
growth=$(awk -v w="$rss_warm" -v m="$rss_max" 'BEGIN { printf "%.2f", 100 * (m - w) / w }')
cat "$WORK/samples" >&2

sent=$(awk '/Queries sent:/ { print $3 }' "$WORK/dnsperf.out")
lost=$(awk '/Queries lost:/ { print $3 }' "$WORK/dnsperf.out")
achieved=$(awk '/Queries per second:/ { printf "%d", $4 }' "$WORK/dnsperf.out")
[ -n "$sent" ] || { cat "$WORK/dnsperf.out" >&2; die "no dnsperf summary"; }
codes=$(sed -n 's/.*Response codes: //p' "$WORK/dnsperf.out")
rcode() { echo "$codes" | tr ',' '\n' | awk -v c="$1" '$1 == c { print $2; f = 1 } END { if (!f) print 0 }'; }
noerror=$(rcode NOERROR)
servfail=$(rcode SERVFAIL)
panics=$(grep -c 'panicked' "$WORK/discotech.log" || true)

echo "RESULT name=soak qps=$QPS duration_s=$DURATION queries=$sent lost=$lost noerror=$noerror servfail=$servfail" \
    "achieved_qps=$achieved rss_warm_kb=$rss_warm rss_max_kb=$rss_max rss_end_kb=$rss_end growth_pct=$growth" \
    "fds_warm=$fds_warm fds_end=$fds_end threads_end=$threads_end daemon_socket_drops=$drops udp_rcvbuf_errors=$rcvbuf" \
    "daemon_rcvbuf=${rcvbuf_bytes:-?}" \
    "panics=$panics load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
[ "$lost" = 0 ] && [ "$servfail" = 0 ] && [ "$panics" = 0 ] &&
    { [ "$CHECK_RSS" != 1 ] || awk -v g="$growth" -v m="$MAX_GROWTH_PCT" 'BEGIN { exit !(g < m) }'; }
