#!/usr/bin/env bash
# Chaos: the daemon killed with SIGKILL and restarted, again and again, under hooked connect load.
#
#   tests/chaos/daemon-restarts.sh                       # full length: 100 restarts (~5 min)
#   RESTARTS=5 RATE=200 UP=1 tests/chaos/daemon-restarts.sh   # short form (~15 s)
#
# Inside a private network + mount namespace (see lib.sh): three services (svc1..svc3.disco, with
# the policies in LBS), each with two greeters on 127.0.1.N:7001 and 127.0.2.N:7001 that write their
# name; CLIENTS loadclient processes (loadclient.c) under LD_PRELOAD of the hook, each connecting
# RATE times a second to the three magic addresses in turn and checking that the greeting comes
# from a backend of the right service. The second half of the clients re-exec themselves every
# EXEC_EVERY connects, so fresh processes load the hook and map the routing table while the daemon
# may be down. Then RESTARTS times: SIGKILL the daemon, wait DOWN s, start it again, wait until it
# answers DNS, check that every magic address still means the same service, wait UP s.
#
# Env (defaults): RESTARTS=100 CLIENTS=4 RATE=1000 (connects/s per client) DOWN=0.2 UP=2 WARM=2
#   EXEC_EVERY=500 LBS="weighted-round-robin p2c least-conn", plus the binaries of lib.sh.
# Needs root, dig, cc, and the daemon and hook built.
#
# Last line: RESULT name=daemon-restarts restarts=N connects=N failed=N wrong=N magic_changed=N
#   corrupt_files=N panics=N max_connect_ms=N restart_to_dns_ms_p50=N restart_to_dns_ms_p99=N ...
# The goal is failed=0 wrong=0 magic_changed=0 corrupt_files=0 panics=0; exit status 1 otherwise.
set -eu
CHAOS_NAME=daemon-restarts
. "$(dirname "$0")/lib.sh"

RESTARTS=${RESTARTS:-100}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-1000}
DOWN=${DOWN:-0.2}
UP=${UP:-2}
WARM=${WARM:-2}
EXEC_EVERY=${EXEC_EVERY:-500}
LBS=${LBS:-weighted-round-robin p2c least-conn}

chaos_enter "$@"
need dig cc unshare
need_binaries
cc_client greeter
cc_client loadclient

# Three services, two greeters each.
: >"$WORK/zones/chaos.toml"
n=0
for lb in $LBS; do
    n=$((n + 1))
    greeter "svc$n-a" "127.0.1.$n"
    greeter "svc$n-b" "127.0.2.$n"
    wait_listening "127.0.1.$n:7001" "127.0.2.$n:7001"
    printf '[services.svc%d]\nlb = "%s"\nbackends = ["127.0.1.%d:7001", "127.0.2.%d:7001"]\n\n' \
        "$n" "$lb" "$n" "$n" >>"$WORK/zones/chaos.toml"
done
SERVICES=$n
write_config 'upstreams = []' ''
start_daemon

declare -A BEFORE
TARGETS=()
for i in $(seq 1 "$SERVICES"); do
    BEFORE[$i]=$(magic "svc$i.disco")
    case ${BEFORE[$i]} in 127.77.*) ;; *) die "svc$i.disco has no magic address: '${BEFORE[$i]}'" ;; esac
    TARGETS+=("${BEFORE[$i]}:7001=svc$i-")
done
log "magic addresses: ${TARGETS[*]}"

# Long enough for the whole run; the stop file ends the clients earlier.
BOUND=$(awk -v r="$RESTARTS" -v d="$DOWN" -v u="$UP" -v w="$WARM" 'BEGIN { printf "%d", r * (d + u + 3) + 3 * w + 60 }')
STOP=$WORK/stop
CLIENT_PIDS=""
for c in $(seq 1 "$CLIENTS"); do
    every=0
    [ "$c" -gt $((CLIENTS / 2)) ] && every=$EXEC_EVERY
    env LD_PRELOAD="$HOOK_LIB" DISCOTECH_SOCKET="$WORK/run/hook.sock" \
        "$WORK/loadclient" "$RATE" "$BOUND" "$STOP" "$every" "${TARGETS[@]}" \
        >"$WORK/client-$c.out" 2>"$WORK/client-$c.err" &
    CLIENT_PIDS="$CLIENT_PIDS $!"
    track $!
done
sleep "$WARM"

magic_changed=0
up_max=0
log "killing the daemon $RESTARTS times (down ${DOWN}s, up ${UP}s)"
for r in $(seq 1 "$RESTARTS"); do
    sig_child KILL "$DPID"
    wait "$DPID" 2>/dev/null || true
    echo "KILL $(now_ms) restart $r" >>"$WORK/timeline"
    sleep "$DOWN"
    start_daemon
    echo "UP $(now_ms) restart $r after ${UP_MS}ms" >>"$WORK/timeline"
    [ "$UP_MS" -gt "$up_max" ] && up_max=$UP_MS
    for i in $(seq 1 "$SERVICES"); do
        m=$(magic "svc$i.disco")
        if [ "$m" != "${BEFORE[$i]}" ]; then
            magic_changed=$((magic_changed + 1))
            log "restart $r: svc$i.disco is '$m', was ${BEFORE[$i]}"
        fi
    done
    [ $((r % 10)) = 0 ] && log "restart $r/$RESTARTS done (DNS back after ${UP_MS} ms)"
    sleep "$UP"
done
sleep "$WARM"
touch "$STOP"
for p in $CLIENT_PIDS; do wait "$p" || true; done

# Totals over the clients' last lines.
read -r connects failed wrong execs max_us rate <<EOF
$(for c in $(seq 1 "$CLIENTS"); do tail -1 "$WORK/client-$c.out"; done | tr '=' ' ' | awk '
    NF >= 14 { ok += $2; f += $4; w += $6; e += $8; if ($10 > m) m = $10; r += $14; n++ }
    END { if (n == 0) { print "0 -1 0 0 0 0" } else printf "%d %d %d %d %d %d\n", ok + f + w, f, w, e, m, r }')
EOF
clients_done=$(for c in $(seq 1 "$CLIENTS"); do tail -1 "$WORK/client-$c.out"; done | grep -c '^ok=' || true)
if [ "$clients_done" != "$CLIENTS" ]; then
    log "only $clients_done of $CLIENTS clients reported; stderr:"
    cat "$WORK"/client-*.err >&2
    failed=-1
fi
if [ "$failed" != 0 ] || [ "$wrong" != 0 ]; then
    log "failures (first of each client), against the timeline in $WORK/timeline:"
    grep -h FAIL "$WORK"/client-*.err | head -20 >&2 || true
    KEEP=1
fi
for i in $(seq 1 "$SERVICES"); do
    m=$(magic "svc$i.disco")
    [ "$m" = "${BEFORE[$i]}" ] || magic_changed=$((magic_changed + 1))
done
# Restart to DNS answer, p50 and p99 over the restarts; the slowest ones to the log.
read -r up_p50 up_p99 <<EOF
$(awk '/^UP/ { sub("ms", "", $6); print $6 }' "$WORK/timeline" | sort -n |
    awk '{ v[NR] = $1 } END { printf "%d %d\n", v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)] }')
EOF
log "slowest restarts (restart number, ms to DNS): $(awk '/^UP/ { sub("ms", "", $6); print $4, $6 }' "$WORK/timeline" | sort -k2 -n | tail -3 | tr '\n' ' ')"
corrupt=$(find "$WORK/state" -name '*.corrupt*' | wc -l)
panics=$(grep -c 'panicked' "$WORK/discotech.log" || true)

echo "RESULT name=daemon-restarts restarts=$RESTARTS clients=$CLIENTS rate_per_client=$RATE achieved_rate=$rate" \
    "connects=$connects failed=$failed wrong=$wrong execs=$execs magic_changed=$magic_changed" \
    "corrupt_files=$corrupt panics=$panics max_connect_ms=$((max_us / 1000))" \
    "restart_to_dns_ms_p50=$up_p50 restart_to_dns_ms_p99=$up_p99 restart_to_dns_ms_max=$up_max" \
    "load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
[ "$failed" = 0 ] && [ "$wrong" = 0 ] && [ "$magic_changed" = 0 ] && [ "$corrupt" = 0 ] && [ "$panics" = 0 ]
