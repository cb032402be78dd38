#!/usr/bin/env bash
# Chaos: ZooKeeper cut off by a network that drops every packet, for a long while, under DNS load;
# every service name must keep answering with what it had (0 NXDOMAIN, 0 SERVFAIL, 100% answered).
#
#   tests/chaos/zk-unreachable.sh                               # full length: 600 s partition (~12 min)
#   PARTITION=20 SERVICES=5 QPS=200 tests/chaos/zk-unreachable.sh   # short form (~50 s)
#
# Inside a private network + mount namespace (see lib.sh) the script makes a second network
# namespace for ZooKeeper (Debian package), joined by a veth pair: 10.99.0.1 (daemon's side) and
# 10.99.0.2:2181 (ZooKeeper). SERVICES services of 3 instances each are written to /disco, and
# discotech follows them (ZooKeeper source, default session_timeout 10 s). Then both ends of the veth
# drop every packet (`tc qdisc ... netem loss 100%`; where the kernel has no netem, a `pfifo limit 0`
# qdisc, which drops every packet it is given: the RESULT says which) for PARTITION s, while dnsperf
# asks A and SRV of every service at QPS/s and, every CHECK_EVERY s, dig checks every service's SRV
# answer and magic address against what they were before. Still partitioned, the daemon is then
# restarted (SIGTERM, start): it must serve every service from its last-known-good file at once
# (cold_dns_ms: from the start until it answers DNS; cold_start_ms: until svc1 answers its SRV set
# as before; then every service is checked once more). Then the partition heals,
# a new instance is written to ZooKeeper, and the script waits (at most RECOVER_WAIT s) until the
# daemon serves it (recovered_ms; the ZooKeeper client may sit in the kernel's SYN back-off, see
# docs/limitations.md).
#
# Env (defaults): PARTITION=600 SERVICES=20 QPS=1000 CHECK_EVERY=10 SESSION=10 RECOVER_WAIT=300,
#   plus lib.sh's. Needs root, dig, dnsperf, iproute2 (tc), java and zookeeper, the daemon and zkctl.
#
# Last line: RESULT name=zk-unreachable partition_s=N loss=netem|pfifo0 services=N queries=N noerror=N
#   nxdomain=N servfail=N lost=N answered_pct=N checks=N check_failures=N failure_noticed_ms=N
#   cold_dns_ms=N cold_start_ms=N recovered_ms=N
# The goal: nxdomain=0 servfail=0 lost=0 check_failures=0, cold start served, recovery; exit 1 otherwise.
set -eu
CHAOS_NAME=zk-unreachable
. "$(dirname "$0")/lib.sh"

PARTITION=${PARTITION:-600}
SERVICES=${SERVICES:-20}
QPS=${QPS:-1000}
CHECK_EVERY=${CHECK_EVERY:-10}
SESSION=${SESSION:-10}
RECOVER_WAIT=${RECOVER_WAIT:-300}

chaos_enter "$@"
need dig dnsperf java tc
need_binaries
[ -x "$ZKCTL" ] || die "no zkctl at $ZKCTL (cargo build --example zkctl)"

# ZooKeeper's own network namespace (this script's mount namespace, so it sees the work dir).
unshare --net sleep $((PARTITION + RECOVER_WAIT + 600)) &
ZKNS=$!
track $ZKNS
sleep 0.2
ip link add vz0 type veth peer name vz1 netns "$ZKNS"
ip addr add 10.99.0.1/24 dev vz0
ip link set vz0 up
nsenter -t "$ZKNS" -n sh -c 'ip link set lo up && ip addr add 10.99.0.2/24 dev vz1 && ip link set vz1 up'
zk_start 10.99.0.2 2181 nsenter -t "$ZKNS" -n

cmds=()
for s in $(seq 1 "$SERVICES"); do
    for b in 1 2 3; do cmds+=("create /disco/svc$s/127.1.$s.$b:80"); done
done
"$ZKCTL" "$ZK_HOSTS" "${cmds[@]}" >/dev/null
write_config 'upstreams = []' "[[source]]
kind = \"zookeeper\"
name = \"zk\"
hosts = [\"$ZK_HOSTS\"]
root = \"/disco\"
session_timeout = \"${SESSION}s\"
format = \"host-port\""
start_daemon

: >"$WORK/queries"
declare -A MAGIC
for s in $(seq 1 "$SERVICES"); do
    printf '127.1.%d.1:80\n127.1.%d.2:80\n127.1.%d.3:80\n' "$s" "$s" "$s" >"$WORK/want-$s"
    i=0
    until srv_set "svc$s.disco" | cmp -s - "$WORK/want-$s"; do
        i=$((i + 1))
        [ "$i" -lt 200 ] || die "svc$s.disco never served its ZooKeeper instances"
        sleep 0.05
    done
    MAGIC[$s]=$(magic "svc$s.disco")
    printf 'svc%d.disco A\nsvc%d.disco SRV\n' "$s" "$s" >>"$WORK/queries"
done

# check: how many services answer differently from before (SRV set or magic address).
check() {
    local s bad=0
    for s in $(seq 1 "$SERVICES"); do
        if ! srv_set "svc$s.disco" | cmp -s - "$WORK/want-$s" || [ "$(magic "svc$s.disco")" != "${MAGIC[$s]}" ]; then
            bad=$((bad + 1))
        fi
    done
    echo "$bad"
}

# drop_all DEV [NSENTER...]: every packet leaving DEV is dropped.
drop_all() {
    local dev=$1
    shift
    if "$@" tc qdisc add dev "$dev" root netem loss 100% 2>/dev/null; then
        LOSS=netem
    else
        "$@" tc qdisc add dev "$dev" root pfifo limit 0
        LOSS=pfifo0
    fi
}
drop_all vz0
drop_all vz1 nsenter -t "$ZKNS" -n
t_cut=$(now_ms)
log "partitioned ($LOSS) for ${PARTITION}s; dnsperf at $QPS/s on $SERVICES services"
dnsperf -s 127.0.0.53 -d "$WORK/queries" -l "$PARTITION" -Q "$QPS" -c 4 -t 5 >"$WORK/dnsperf.out" 2>&1 &
PERF=$!
track $PERF
checks=0
check_failures=0
noticed_ms=-1
while [ $(($(now_ms) - t_cut)) -lt $((PARTITION * 1000)) ]; do
    b=$(check)
    checks=$((checks + 1))
    [ "$b" = 0 ] || { check_failures=$((check_failures + b)); log "check $checks: $b services differ"; }
    if [ "$noticed_ms" = -1 ] && grep -q 'last good services keep serving' "$WORK/discotech.log"; then
        noticed_ms=$(($(now_ms) - t_cut))
    fi
    left=$((PARTITION * 1000 - ($(now_ms) - t_cut)))
    [ "$left" -gt $((CHECK_EVERY * 1000)) ] || break
    sleep "$CHECK_EVERY"
done
wait "$PERF" || true

# Still partitioned: a restarted daemon serves the last known good state at once.
sleep 1.2 # backends.json is written at most once a second
sig_child TERM "$DPID"
wait "$DPID" 2>/dev/null || true
t_start=$(now_ms)
start_daemon
cold_dns_ms=$UP_MS
cold_start_ms=-1
while [ $(($(now_ms) - t_start)) -lt 10000 ]; do
    if srv_set svc1.disco | cmp -s - "$WORK/want-1"; then
        cold_start_ms=$(($(now_ms) - t_start))
        break
    fi
    sleep 0.02
done
b=$(check)
checks=$((checks + 1))
[ "$b" = 0 ] || { check_failures=$((check_failures + b)); log "after the restart: $b services differ"; }

# Heal; a change must come through.
tc qdisc del dev vz0 root
nsenter -t "$ZKNS" -n tc qdisc del dev vz1 root
t_heal=$(now_ms)
"$ZKCTL" "$ZK_HOSTS" "create /disco/svc1/127.1.1.4:80" >/dev/null
recovered_ms=-1
while [ $(($(now_ms) - t_heal)) -lt $((RECOVER_WAIT * 1000)) ]; do
    if srv_set svc1.disco | grep -qx '127.1.1.4:80'; then
        recovered_ms=$(($(now_ms) - t_heal))
        break
    fi
    sleep 0.2
done

sent=$(awk '/Queries sent:/ { print $3 }' "$WORK/dnsperf.out")
answered=$(awk '/Queries completed:/ { print $3 }' "$WORK/dnsperf.out")
lost=$(awk '/Queries lost:/ { print $3 }' "$WORK/dnsperf.out")
[ -n "$sent" ] || { cat "$WORK/dnsperf.out" >&2; die "no dnsperf summary"; }
codes=$(sed -n 's/.*Response codes: //p' "$WORK/dnsperf.out")
rcode() { echo "$codes" | tr ',' '\n' | awk -v c="$1" '$1 == c { print $2; f = 1 } END { if (!f) print 0 }'; }
noerror=$(rcode NOERROR)
nxdomain=$(rcode NXDOMAIN)
servfail=$(rcode SERVFAIL)
pct=$(awk -v a="$noerror" -v s="$sent" 'BEGIN { printf "%.3f", s ? 100 * a / s : 0 }')
panics=$(grep -c 'panicked' "$WORK/discotech.log" || true)

echo "RESULT name=zk-unreachable partition_s=$PARTITION loss=$LOSS services=$SERVICES qps=$QPS queries=$sent" \
    "noerror=$noerror nxdomain=$nxdomain servfail=$servfail lost=$lost answered_pct=$pct checks=$checks" \
    "check_failures=$check_failures failure_noticed_ms=$noticed_ms cold_dns_ms=$cold_dns_ms cold_start_ms=$cold_start_ms" \
    "recovered_ms=$recovered_ms panics=$panics load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
[ "$nxdomain" = 0 ] && [ "$servfail" = 0 ] && [ "$lost" = 0 ] && [ "$noerror" = "$sent" ] &&
    [ "$check_failures" = 0 ] && [ "$cold_start_ms" -ge 0 ] && [ "$recovered_ms" -ge 0 ] && [ "$panics" = 0 ]
