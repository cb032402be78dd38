#!/usr/bin/env bash
# Chaos: the upstream resolver dies for a long while; every forwarded name cached before must keep
# resolving (served stale, RFC 8767), with no SERVFAIL.
#
#   tests/chaos/upstream-down.sh                    # full length: upstream down 600 s (~11 min)
#   DOWN=15 NAMES=50 QPS=200 tests/chaos/upstream-down.sh   # short form (~25 s)
#
# Inside a private network + mount namespace (see lib.sh): dnsmasq on 127.0.0.2:53 answers NAMES
# names name-N.up.test with TTL UPSTREAM_TTL; discotech on 127.0.0.53 forwards to it. Every name is
# asked once (cached), then the upstream is taken away for DOWN seconds: MODE=kill kills dnsmasq
# (the port refuses: each forward fails at once), MODE=stop freezes it with SIGSTOP (queries go
# unanswered: each forward waits for dns.timeout, 2 s). Meanwhile dnsperf asks the cached names at
# QPS queries/s (its response codes and lost queries are counted), and every CHECK_EVERY seconds
# dig asks every name (as many as it can before the outage ends) and checks the address is the one
# cached. Afterwards the upstream comes
# back and a name must be answered fresh again (its own TTL, not the stale TTL 30).
#
# Env (defaults): DOWN=600 NAMES=200 QPS=500 CHECK_EVERY=10 UPSTREAM_TTL=2 MODE=kill, plus lib.sh's.
# Needs root, dig, dnsperf, dnsmasq (dnsmasq-base), the daemon built.
#
# Last line: RESULT name=upstream-down mode=... down_s=N names=N queries=N noerror=N servfail=N
#   other_rcode=N lost=N checks=N check_failures=N check_answers=N check_answer_ms_max=N
#   check_answers_over_1s=N (how long the dig checks waited for their answers) recovered_ms=N
# The goal is servfail=0 other_rcode=0 lost=0 check_failures=0 and recovery; exit status 1 otherwise.
set -eu
CHAOS_NAME=upstream-down
. "$(dirname "$0")/lib.sh"

DOWN=${DOWN:-600}
NAMES=${NAMES:-200}
QPS=${QPS:-500}
CHECK_EVERY=${CHECK_EVERY:-10}
UPSTREAM_TTL=${UPSTREAM_TTL:-2}
MODE=${MODE:-kill}

chaos_enter "$@"
need dig dnsperf dnsmasq
need_binaries
case $MODE in kill | stop) ;; *) die "MODE is kill or stop" ;; esac

records=()
: >"$WORK/expected"
: >"$WORK/queries"
for i in $(seq 1 "$NAMES"); do
    ip=10.1.$((i / 250)).$((i % 250 + 1))
    records+=("--host-record=name-$i.up.test,$ip")
    echo "name-$i.up.test. $ip" >>"$WORK/expected"
    echo "name-$i.up.test A" >>"$WORK/queries"
done
sort -o "$WORK/expected" "$WORK/expected"
dnsmasq_upstream 127.0.0.2 "$UPSTREAM_TTL" "${records[@]}"
until [ -n "$(dig @127.0.0.2 +short +time=1 +tries=1 name-1.up.test 2>/dev/null)" ]; do
    kill -0 "$UPSTREAM_PID" || die "dnsmasq did not start: $(cat "$WORK/dnsmasq.log")"
    sleep 0.05
done
write_config 'upstreams = ["127.0.0.2:53"]' ''
start_daemon

# check [DEADLINE_MS]: asks every name once (dig batches of 20), or as many as it can before
# DEADLINE_MS (a silent upstream makes each answer wait); prints how many of those asked are missing
# or wrong. Each answer's time goes to $WORK/times (ms, one a line).
split -l 20 -d "$WORK/expected" "$WORK/chunk."
: >"$WORK/times"
check() {
    local c missing=0
    for c in "$WORK"/chunk.*; do
        [ -z "${1:-}" ] || [ "$(now_ms)" -lt "$1" ] || break
        awk '{ print $1 " A" }' "$c" >"$WORK/batch"
        dig @127.0.0.53 +time=5 +tries=1 +noall +answer +stats -f "$WORK/batch" 2>/dev/null >"$WORK/dig.out"
        awk '/^;; Query time:/ { print $4 }' "$WORK/dig.out" >>"$WORK/times"
        awk '$4 == "A" { print tolower($1), $5 }' "$WORK/dig.out" | sort -u >"$WORK/got"
        missing=$((missing + $(comm -23 "$c" "$WORK/got" | tee -a "$WORK/wrong" | wc -l)))
    done
    echo "$missing"
}
missing=$(check)
[ "$missing" = 0 ] || die "$missing names were not answered before the upstream went away"
: >"$WORK/times"
log "$NAMES names cached; upstream down ($MODE) for ${DOWN}s"

case $MODE in
kill) sig_child KILL "$UPSTREAM_PID"; wait "$UPSTREAM_PID" 2>/dev/null || true ;;
stop) sig_child STOP "$UPSTREAM_PID" ;;
esac
t_down=$(now_ms)
dnsperf -s 127.0.0.53 -d "$WORK/queries" -l "$DOWN" -Q "$QPS" -c 4 -t 5 >"$WORK/dnsperf.out" 2>&1 &
PERF=$!
track $PERF
checks=0
check_failures=0
while [ $(($(now_ms) - t_down)) -lt $((DOWN * 1000)) ]; do
    : >"$WORK/wrong"
    m=$(check $((t_down + DOWN * 1000)))
    checks=$((checks + 1))
    if [ "$m" != 0 ]; then
        check_failures=$((check_failures + m))
        log "check $checks: $m names missing or wrong:"
        head -5 "$WORK/wrong" >&2
    fi
    left=$((DOWN * 1000 - ($(now_ms) - t_down)))
    [ "$left" -gt $((CHECK_EVERY * 1000)) ] || break
    sleep "$CHECK_EVERY"
done
wait "$PERF" || true

# The upstream returns: a name is answered fresh again (its own TTL, not the stale TTL 30).
case $MODE in
kill) dnsmasq_upstream 127.0.0.2 "$UPSTREAM_TTL" "${records[@]}" ;;
stop) sig_child CONT "$UPSTREAM_PID" ;;
esac
t_back=$(now_ms)
recovered_ms=-1
while [ $(($(now_ms) - t_back)) -lt 45000 ]; do
    ttl=$(dig @127.0.0.53 +time=3 +tries=1 +noall +answer name-1.up.test A 2>/dev/null | awk '{ print $2; exit }')
    if [ -n "$ttl" ] && [ "$ttl" -le "$UPSTREAM_TTL" ]; then
        recovered_ms=$(($(now_ms) - t_back))
        break
    fi
    sleep 0.1
done

# dnsperf's summary: "Queries sent:", "Queries lost:", "Response codes: NOERROR 123 (100.00%), ...".
sent=$(awk '/Queries sent:/ { print $3 }' "$WORK/dnsperf.out")
lost=$(awk '/Queries lost:/ { print $3 }' "$WORK/dnsperf.out")
codes=$(sed -n 's/.*Response codes: //p' "$WORK/dnsperf.out")
rcode() { echo "$codes" | tr ',' '\n' | awk -v c="$1" '$1 == c { print $2; f = 1 } END { if (!f) print 0 }'; }
noerror=$(rcode NOERROR)
servfail=$(rcode SERVFAIL)
answered=$(awk '/Queries completed:/ { print $3 }' "$WORK/dnsperf.out")
other=$(( ${answered:-0} - noerror - servfail ))
[ -n "$sent" ] || { cat "$WORK/dnsperf.out" >&2; die "no dnsperf summary"; }
# How long the dig checks' answers took during the outage: the largest, and how many took over 1 s.
read -r answer_ms_max slow_answers <<EOF
$(awk '{ if ($1 > m) m = $1; if ($1 > 1000) n++ } END { printf "%d %d\n", m, n }' "$WORK/times")
EOF
stale=$(grep -o 'discotech_forward_cache_total{result="stale"} [0-9]*' <(curl -s --max-time 5 http://127.0.0.1:9253/metrics 2>/dev/null) | awk '{ print $2 }' || true)

echo "RESULT name=upstream-down mode=$MODE down_s=$DOWN names=$NAMES qps=$QPS queries=$sent noerror=$noerror" \
    "servfail=$servfail other_rcode=$other lost=$lost checks=$checks check_failures=$check_failures" \
    "check_answers=$(wc -l <"$WORK/times") check_answer_ms_max=$answer_ms_max check_answers_over_1s=$slow_answers" \
    "stale_answers=${stale:-?} recovered_ms=$recovered_ms load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
[ "$servfail" = 0 ] && [ "$other" = 0 ] && [ "$lost" = 0 ] && [ "$check_failures" = 0 ] && [ "$recovered_ms" -ge 0 ]
