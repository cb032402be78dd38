# Shared by the chaos scripts beside this file (sourced, not run): a private network + mount
# namespace per script, a work directory, a cleanup trap that kills everything the script started,
# and helpers to start discotech, greeters, dnsmasq and ZooKeeper inside it.
#
# Binaries (env knobs shared by every script):
#   DISCOTECH   the daemon binary        (default <repo>/target/debug/discotech; BIN_DIR changes the dir)
#   HOOK_LIB    libdiscotech_hook.so     (default beside DISCOTECH)
#   ZKCTL       the zkctl example        (default <dir of DISCOTECH>/examples/zkctl)
#   KEEP=1      keep the work directory (its path is printed) instead of deleting it
# Nothing here builds Rust code: build first (`cargo build --workspace --all-targets`, or
# `cargo build --release -p discotech -p discotech-hook` and BIN_DIR=target/release for speed).
# The C clients under tests/ are compiled into the work dir with cc on every run (a second each).

CHAOS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CHAOS_DIR/../.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
DISCOTECH=${DISCOTECH:-$BIN_DIR/discotech}
HOOK_LIB=${HOOK_LIB:-$(dirname "$DISCOTECH")/libdiscotech_hook.so}
ZKCTL=${ZKCTL:-$(dirname "$DISCOTECH")/examples/zkctl}
KEEP=${KEEP:-0}
ZK_CLASSPATH=/usr/share/java/zookeeper.jar:/etc/zookeeper/conf

log() { printf '[%s %s] %s\n' "$CHAOS_NAME" "$(date +%T)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Milliseconds since the epoch (bash 5's EPOCHREALTIME, no fork).
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    echo $((t / 1000))
}

# Re-executes the calling script inside a new network + mount namespace (loopback only; nothing
# the script does can reach the host's network or its /etc/resolv.conf), once.
chaos_enter() {
    [ "$(id -u)" = 0 ] || die "needs root (unshare --net --mount)"
    if [ "${CHAOS_INNER:-}" != 1 ]; then
        exec env CHAOS_INNER=1 unshare --net --mount --propagation private -- bash "$0" "$@"
    fi
    ip link set lo up
    WORK=$(mktemp -d "/tmp/chaos-$CHAOS_NAME.XXXXXX")
    chmod 700 "$WORK"
    mkdir -m 700 "$WORK/zones" "$WORK/state" "$WORK/run"
    PIDS=""
    # bash runs a trap only between commands: long waits are `cmd & wait`, so a TERM (a timeout)
    # cleans up at once.
    trap chaos_cleanup EXIT
    trap 'exit 130' INT TERM
    # Programs that use the system resolver inside the namespace ask the daemon under test.
    printf 'nameserver 127.0.0.53\noptions timeout:2 attempts:1\n' >"$WORK/resolv.conf"
    mount --bind "$WORK/resolv.conf" /etc/resolv.conf
}

# Remembers a pid for the cleanup trap.
track() { PIDS="$PIDS $*"; }

# sig_child SIGNAL PID: signals PID only while it is still a child of this script. Pids come back
# quickly (pid_max may be 32768) and bash reaps its children by itself, so a pid kept after its
# process went may belong to someone else's process by now: never signal that one.
sig_child() {
    local ppid
    ppid=$(awk '/^PPid:/ { print $2 }' "/proc/$2/status" 2>/dev/null) || return 0
    if [ "$ppid" = $$ ]; then kill "-$1" "$2" 2>/dev/null || true; fi
}

chaos_cleanup() {
    local rc=$? p me
    trap - EXIT INT TERM
    # bash reports each killed job ("Killed ..."): not news here.
    exec 3>&2 2>/dev/null
    for p in $PIDS; do sig_child CONT "$p"; sig_child TERM "$p"; done
    sleep 0.2
    for p in $PIDS; do sig_child KILL "$p"; done
    # Anything else still in this script's private network namespace was started by it (the
    # namespace is only ours): end those too, by pid, so the namespace goes away with us.
    me=$(readlink /proc/$$/ns/net)
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$me" ] && kill -KILL "$p" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
        log "work dir kept: $WORK" 2>&3
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}

need() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null || die "$c is not installed"; done
}

need_binaries() {
    [ -x "$DISCOTECH" ] || die "no daemon binary at $DISCOTECH (build it, or set DISCOTECH/BIN_DIR)"
    [ -f "$HOOK_LIB" ] || die "no hook library at $HOOK_LIB (cargo build -p discotech-hook)"
}

# cc_client NAME: compiles tests/chaos/NAME.c (or tests/clients/NAME.c) into the work dir.
cc_client() {
    local src=$CHAOS_DIR/$1.c
    [ -f "$src" ] || src=$ROOT/tests/clients/$1.c
    cc -O2 -Wall -pthread -o "$WORK/$1" "$src" || die "cannot compile $src"
}

# write_config EXTRA_DNS EXTRA: a daemon config in $WORK/discotech.toml listening on 127.0.0.53,
# state, sockets and zones in the work dir; EXTRA_DNS goes into [dns], EXTRA after everything.
write_config() {
    cat >"$WORK/discotech.toml" <<EOF
[dns]
listen = ["127.0.0.53:53"]
$1
[state]
dir = "$WORK/state"
[hook]
socket = "$WORK/run/hook.sock"
[admin]
socket = "$WORK/run/admin.sock"
[[source]]
kind = "file"
path = "$WORK/zones"
$2
EOF
}

# start_daemon [WRAPPER...]: starts `discotech serve` (appending to $WORK/discotech.log) and waits,
# at most DAEMON_WAIT s (default 10), until it answers DNS. Sets DPID, and UP_MS to how long that took.
start_daemon() {
    local t0 deadline
    t0=$(now_ms)
    "$@" "$DISCOTECH" serve --config "$WORK/discotech.toml" >>"$WORK/discotech.log" 2>&1 &
    DPID=$!
    track "$DPID"
    deadline=$((t0 + ${DAEMON_WAIT:-10} * 1000))
    until [ -n "$(dig @127.0.0.53 +short +time=1 +tries=1 disco SOA 2>/dev/null)" ]; do
        if [ "$(now_ms)" -gt "$deadline" ] || ! kill -0 "$DPID" 2>/dev/null; then
            tail -30 "$WORK/discotech.log" >&2
            die "discotech did not answer DNS"
        fi
        sleep 0.02
    done
    UP_MS=$(($(now_ms) - t0))
}

# greeter NAME IP [PORT]: a backend that writes "NAME\n" to every connection (tests/clients/greeter.c);
# it exits by itself after 2 hours, should anything survive the cleanup.
greeter() {
    "$WORK/greeter" "$1" "$2" "${3:-7001}" 7200 >"$WORK/greeter-$1.log" 2>&1 &
    track $!
}

# wait_listening IP:PORT...: until each accepts a TCP connection (bounded, 5 s each).
wait_listening() {
    local a i
    for a in "$@"; do
        i=0
        until timeout 1 bash -c "exec 3<>/dev/tcp/${a%:*}/${a##*:}" 2>/dev/null; do
            i=$((i + 1))
            [ "$i" -lt 50 ] || die "nothing listens on $a"
            sleep 0.1
        done
    done
}

# magic NAME: the service's magic address (empty if it does not answer).
magic() { dig @127.0.0.53 +short +time=2 +tries=2 "$1" A 2>/dev/null | head -1; }

# srv_set NAME: the SRV answer as sorted ip:port lines ("0 1 80 127-0-2-5.svc3.disco." -> 127.0.2.5:80).
srv_set() {
    dig @127.0.0.53 +short +time=2 +tries=2 "$1" SRV 2>/dev/null |
        awk '{ split($4, a, "."); gsub("-", ".", a[1]); print a[1] ":" $3 }' | sort
}

# dnsmasq_upstream ADDR TTL [ARGS...]: dnsmasq answering only what ARGS give it, on ADDR:53.
dnsmasq_upstream() {
    local addr=$1 ttl=$2
    shift 2
    dnsmasq --keep-in-foreground --no-resolv --no-hosts --conf-file=/dev/null --bind-interfaces \
        --listen-address="$addr" --port=53 --pid-file= --user=root --local-ttl="$ttl" \
        --cache-size=0 "$@" >>"$WORK/dnsmasq.log" 2>&1 &
    UPSTREAM_PID=$!
    track "$UPSTREAM_PID"
}

# zk_start HOST PORT [NSENTER...]: a standalone ZooKeeper (Debian package) with a data dir in the
# work dir, tickTime 500 ms (sessions down to 1 s), optionally run through NSENTER (another
# namespace); waits until it answers. Sets ZK_PID and ZK_HOSTS.
zk_start() {
    local host=$1 port=$2
    shift 2
    ZK_HOSTS=$host:$port
    mkdir -p "$WORK/zk-data"
    cat >"$WORK/zoo.cfg" <<EOF
tickTime=500
dataDir=$WORK/zk-data
clientPort=$port
clientPortAddress=$host
admin.enableServer=false
4lw.commands.whitelist=
minSessionTimeout=1000
maxSessionTimeout=30000
maxClientCnxns=0
EOF
    zk_restart "$@"
}

zk_restart() {
    "$@" java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Dzookeeper.admin.enableServer=false \
        -cp "$ZK_CLASSPATH" org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zoo.cfg" \
        >>"$WORK/zookeeper.log" 2>&1 &
    ZK_PID=$!
    track "$ZK_PID"
    "$ZKCTL" "$ZK_HOSTS" wait >/dev/null || die "ZooKeeper did not start (see $WORK/zookeeper.log)"
}

# rss_kb PID: resident set size in kB.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
