#!/usr/bin/env bash
# Chaos: the daemon's ZooKeeper session expires (and ZooKeeper restarts) in the middle of a stream
# of changes; afterwards what the daemon serves (dig SRV) must equal ZooKeeper's children.
#
#   tests/chaos/zk-expiry.sh                                            # full length: 1,000 changes (~2 min)
#   CHANGES=200 EXPIRE_AT=100 ZK_RESTART_AT= FREEZE=5 tests/chaos/zk-expiry.sh   # short form (~40 s)
#
# Inside a private network + mount namespace (see lib.sh): ZooKeeper (Debian package) on
# 127.0.0.1:2181, discotech with a ZooKeeper source on /disco (host-port layout, session_timeout
# SESSION). SERVICES services start with one instance each that is never removed (an update to no
# backends is never applied, by design, so no service is ever emptied). Then CHANGES changes at
# RATE a second, in zkctl batches of BATCH: mostly new instances and removals of earlier ones in
# random services, and now and then a new service. When the count reaches each number in EXPIRE_AT,
# the daemon is frozen with SIGSTOP for FREEZE s (past the session timeout, so ZooKeeper expires its
# session) while the writes go on; at ZK_RESTART_AT, ZooKeeper is killed (SIGKILL) and started again
# after ZK_DOWN s (same data dir: a connection loss, the session survives). After the last change,
# the script polls (at most SETTLE s) until every service's SRV answer equals its ZooKeeper children.
# The guard is configured not to hold removals (MAX_DROP=1.0) so that convergence measures the
# ZooKeeper path; with the default guard, sharp drops would be held for the hold-down first.
#
# Env (defaults): CHANGES=1000 RATE=20 BATCH=5 SERVICES=10 SESSION=2 EXPIRE_AT="330 660" FREEZE=8
#   ZK_RESTART_AT=850 ZK_DOWN=3 SETTLE=30 MAX_DROP=1.0 SEED=1, plus lib.sh's.
# Needs root, dig, java and the zookeeper package, the daemon and the zkctl example built.
#
# Last line: RESULT name=zk-expiry changes=N freezes=N expiries_logged=N zk_restarts=N services=N
#   instances=N mismatched_services=N converge_ms=N
# The goal: mismatched_services=0 (and expiries_logged >= freezes); exit status 1 otherwise.
set -eu
CHAOS_NAME=zk-expiry
. "$(dirname "$0")/lib.sh"

CHANGES=${CHANGES:-1000}
RATE=${RATE:-20}
BATCH=${BATCH:-5}
SERVICES=${SERVICES:-10}
SESSION=${SESSION:-2}
EXPIRE_AT=${EXPIRE_AT-330 660}
FREEZE=${FREEZE:-8}
ZK_RESTART_AT=${ZK_RESTART_AT-850}
ZK_DOWN=${ZK_DOWN:-3}
SETTLE=${SETTLE:-30}
MAX_DROP=${MAX_DROP:-1.0}
SEED=${SEED:-1}

chaos_enter "$@"
need dig java
need_binaries
[ -x "$ZKCTL" ] || die "no zkctl at $ZKCTL (cargo build --example zkctl)"
RANDOM=$SEED

zk_start 127.0.0.1 2181
svcs=()
cmds=()
for s in $(seq 0 $((SERVICES - 1))); do
    svcs+=("svc$s")
    cmds+=("create /disco/svc$s/127.0.1.$((s + 1)):80")
done
"$ZKCTL" "$ZK_HOSTS" "${cmds[@]}" >/dev/null

write_config 'upstreams = []' "[[source]]
kind = \"zookeeper\"
name = \"zk\"
hosts = [\"$ZK_HOSTS\"]
root = \"/disco\"
session_timeout = \"${SESSION}s\"
format = \"host-port\"
[guard]
max_drop = $MAX_DROP
hold_down = \"2s\""
start_daemon
i=0
until [ "$(srv_set svc0.disco)" = "127.0.1.1:80" ]; do
    i=$((i + 1))
    [ "$i" -lt 200 ] || die "the daemon never served svc0 from ZooKeeper"
    sleep 0.05
done

# zk BATCH...: one zkctl run; retried for 30 s (ZooKeeper may be restarting).
zk() {
    local t
    for t in $(seq 1 30); do
        "$ZKCTL" "$ZK_HOSTS" "$@" >/dev/null 2>>"$WORK/zkctl.err" && return 0
        sleep 1
    done
    die "zkctl failed for 30 s: $(tail -3 "$WORK/zkctl.err")"
}

dyn=()      # dynamic instances, as paths
next=0      # instance counter (unique addresses)
freezes=0
FREEZERS=""
zk_restarts=0
done_changes=0
pause=$(awk -v b="$BATCH" -v r="$RATE" 'BEGIN { printf "%.3f", b / r }')
log "$CHANGES changes at $RATE/s; freezes at $EXPIRE_AT, ZooKeeper restart at ${ZK_RESTART_AT:-never}"
while [ "$done_changes" -lt "$CHANGES" ]; do
    batch=()
    for _ in $(seq 1 "$BATCH"); do
        [ "$done_changes" -lt "$CHANGES" ] || break
        r=$((RANDOM % 100))
        if [ "$r" -lt 2 ]; then
            s=svc${#svcs[@]}
            svcs+=("$s")
            batch+=("create /disco/$s/127.0.1.$((${#svcs[@]})):80")
        elif [ "$r" -lt 55 ] || [ "${#dyn[@]}" = 0 ]; then
            next=$((next + 1))
            p=/disco/${svcs[RANDOM % ${#svcs[@]}]}/127.2.$((next / 250)).$((next % 250 + 1)):$((1000 + next % 50))
            dyn+=("$p")
            batch+=("create $p")
        else
            k=$((RANDOM % ${#dyn[@]}))
            batch+=("delete ${dyn[k]}")
            dyn[k]=${dyn[${#dyn[@]} - 1]}
            unset 'dyn[${#dyn[@]}-1]'
        fi
        done_changes=$((done_changes + 1))
        for at in $EXPIRE_AT; do
            if [ "$done_changes" = "$at" ]; then
                log "change $at: freezing the daemon for ${FREEZE}s (session timeout ${SESSION}s)"
                (sig_child STOP "$DPID"; sleep "$FREEZE"; sig_child CONT "$DPID") &
                track $!
                FREEZERS="$FREEZERS $!"
                freezes=$((freezes + 1))
            fi
        done
        if [ "$done_changes" = "${ZK_RESTART_AT:-x}" ]; then
            zk "${batch[@]}"
            batch=()
            log "change $done_changes: killing ZooKeeper for ${ZK_DOWN}s"
            { sig_child KILL "$ZK_PID"; wait "$ZK_PID"; } 2>/dev/null || true
            sleep "$ZK_DOWN"
            zk_restart
            zk_restarts=$((zk_restarts + 1))
        fi
    done
    [ "${#batch[@]}" = 0 ] || zk "${batch[@]}"
    sleep "$pause"
done
for p in $FREEZERS; do wait "$p" || true; done
t_last=$(now_ms) # the last change, or the daemon's thaw if later

# Poll until every service's SRV answer equals its ZooKeeper children.
compare() {
    local s bad=0
    for s in $("$ZKCTL" "$ZK_HOSTS" "ls /disco"); do
        "$ZKCTL" "$ZK_HOSTS" "ls /disco/$s" | sort >"$WORK/zk-$s"
        srv_set "$s.disco" >"$WORK/dns-$s"
        cmp -s "$WORK/zk-$s" "$WORK/dns-$s" || bad=$((bad + 1))
    done
    echo "$bad"
}
converge_ms=-1
while :; do
    bad=$(compare)
    if [ "$bad" = 0 ]; then
        converge_ms=$(($(now_ms) - t_last))
        break
    fi
    [ $(($(now_ms) - t_last)) -lt $((SETTLE * 1000)) ] || break
    sleep 0.5
done
if [ "$bad" != 0 ]; then
    KEEP=1
    for s in $("$ZKCTL" "$ZK_HOSTS" "ls /disco"); do
        cmp -s "$WORK/zk-$s" "$WORK/dns-$s" || { log "$s differs (< ZooKeeper, > DNS):"; diff "$WORK/zk-$s" "$WORK/dns-$s" | head -5 >&2 || true; }
    done
fi
services=$("$ZKCTL" "$ZK_HOSTS" "ls /disco" | wc -l)
instances=$(cat "$WORK"/zk-svc* | wc -l)
expired=$(grep -c 'session expired' "$WORK/discotech.log" || true)
panics=$(grep -c 'panicked' "$WORK/discotech.log" || true)

echo "RESULT name=zk-expiry changes=$done_changes freezes=$freezes expiries_logged=$expired zk_restarts=$zk_restarts" \
    "services=$services instances=$instances mismatched_services=$bad converge_ms=$converge_ms panics=$panics" \
    "load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
[ "$bad" = 0 ] && [ "$expired" -ge "$freezes" ] && [ "$panics" = 0 ]
