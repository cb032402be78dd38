#!/bin/sh
# ZooKeeper scale: start-up time, resident memory and the cost of one change at N services of
# B serverset members each, for several N in the same run, interleaved (A B A B ...) over ROUNDS.
# Everything runs in a private mount+network namespace: ZooKeeper (Debian package) on
# 127.0.0.1:2181, `discotech serve` with a zookeeper source on /scale-N, metrics on 127.0.0.1:9253.
#
#   benches/zk/scale.sh                     # SIZES="100 10000" B=20 K=100 ROUNDS=5
#   SIZES="100 1000 10000" K=200 KEEP=1 benches/zk/scale.sh
#   PERF=1 SIZES=10000 ROUNDS=1 benches/zk/scale.sh   # where a change's CPU goes (perf, not timed)
#
# Per round and size: a fresh state dir, daemon started, start-up = spawn until
# discotech_services == N (polled every 50 ms); VmRSS then (VmHWM at the end of the round); then K single changes, one at a
# time and a few ms apart, to one random service each (cycle: setData of a member's port, create of
# an extra member, setData, delete of that extra member), written by a raw ZooKeeper client in
# the driver (no process start or session set-up in the timed path). For each change:
#   publish  = delta of discotech_publish_duration_seconds_sum over delta of _count (registry
#              merge + guard + publish for that change alone: each change is awaited),
#   e2e      = from just before the write is sent to the first /metrics scrape showing the new
#              generation and the publish counted (polled every ~0.2 ms; includes the scrape itself),
#   read/src = the source's own `applied a change` debug log (read_us, total_us).
# The first WARMUP changes of each round are not counted. Prints a markdown table (medians over
# rounds); results also go to $WORK/results.json. docs/performance.md is updated by hand.
#
# Needs root (unshare), the zookeeper and default-jre-headless packages, python3 (and perf for PERF=1).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZES=${SIZES:-"100 10000"}
B=${B:-20}
K=${K:-100}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-5}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release

if [ "${ZKSCALE_INNER:-}" != 1 ]; then
    # Do not measure beside another benchmark: wait (at most WAIT_MAX s) until none of their load
    # generators has run for 15 s in a row. Their scripts, between rounds, see this one under
    # benches/ and pause in turn.
    waited=0
    quiet=0
    while [ "$quiet" -lt 15 ]; do
        if ps -eo args | grep -E '^[^ ]*(dnsperf|wrk|wrk2|connect_bench|zkprop)( |$)' | grep -v grep >/dev/null; then
            quiet=0
            [ "$waited" -eq 0 ] && echo "waiting for another benchmark to finish..." >&2
        else
            quiet=$((quiet + 1))
        fi
        waited=$((waited + 1))
        [ "$waited" -gt "${WAIT_MAX:-600}" ] && { echo "another benchmark is still running; giving up" >&2; exit 1; }
        sleep 1
    done
    (cd "$ROOT" && cargo build --release -q --example zkctl -p discotech && cargo build --release -q)
    exec env ZKSCALE_INNER=1 unshare --net --mount --propagation private -- "$0" "$@"
fi

ip link set lo up
WORK=$(mktemp -d)
ZKPID=""
DPID=""
PERFPID=""
cleanup() {
    [ -n "$PERFPID" ] && kill "$PERFPID" 2>/dev/null || true
    [ -n "$DPID" ] && kill "$DPID" 2>/dev/null || true
    [ -n "$ZKPID" ] && kill "$ZKPID" 2>/dev/null || true
    [ -n "$DPID" ] && wait "$DPID" 2>/dev/null || true
    [ -n "$ZKPID" ] && wait "$ZKPID" 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# The driver: a raw ZooKeeper client (jute over TCP) and a /metrics scraper, standard library only.
cat >"$WORK/drive.py" <<'PY'
import json, os, random, re, socket, struct, sys, time

def scrape():
    s = socket.create_connection(("127.0.0.1", 9253), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    buf = []
    while True:
        b = s.recv(65536)
        if not b:
            break
        buf.append(b)
    s.close()
    m = {}
    for line in b"".join(buf).decode().split("\n"):
        if line.startswith(("discotech_snapshot_generation ", "discotech_services ",
                            "discotech_publish_duration_seconds_sum ",
                            "discotech_publish_duration_seconds_count ")):
            k, v = line.split()[:2]
            m[k] = float(v)
    return m

def key(m, k):
    return m.get("discotech_" + k, 0.0)

class ZK:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(struct.pack(">iqiqi", 0, 0, 30000, 0, 16) + b"\0" * 16 + b"\0")
        self.recv()
        self.xid = 0
    def send(self, b):
        self.s.sendall(struct.pack(">i", len(b)) + b)
    def readn(self, n):
        out = b""
        while len(out) < n:
            c = self.s.recv(n - len(out))
            if not c:
                raise EOFError("zookeeper closed the connection")
            out += c
        return out
    def recv(self):
        return self.readn(struct.unpack(">i", self.readn(4))[0])
    def call(self, op, body):
        self.xid += 1
        self.send(struct.pack(">ii", self.xid, op) + body)
        while True:
            r = self.recv()
            xid, _zxid, err = struct.unpack(">iqi", r[:16])
            if xid != self.xid:
                continue
            if err:
                raise RuntimeError("zookeeper error %d" % err)
            return
    @staticmethod
    def string(s):
        b = s.encode()
        return struct.pack(">i", len(b)) + b
    def set(self, path, data):
        self.call(5, self.string(path) + self.string(data) + struct.pack(">i", -1))
    def create(self, path, data):
        acl = struct.pack(">ii", 1, 31) + self.string("world") + self.string("anyone")
        self.call(1, self.string(path) + self.string(data) + acl + struct.pack(">i", 0))
    def delete(self, path):
        self.call(2, self.string(path) + struct.pack(">i", -1))

def member(s, b, port):
    host = "10.%d.%d.%d" % (s // 256 % 256, s % 256, b % 250 + 1)
    return json.dumps({"serviceEndpoint": {"host": host, "port": port},
                       "additionalEndpoints": {}, "status": "ALIVE"}, separators=(",", ":"))

def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]

def startup(n, t0, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            m = scrape()
            if key(m, "services") == n:
                return time.time() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("discotech did not publish %d services within %ds" % (n, timeout))

def changes(root, n, b, k, warmup, log, rnd_no):
    zk = ZK("127.0.0.1", 2181)
    rnd = random.Random(n * 7919 + k + rnd_no * 104729)
    log_off = os.path.getsize(log)
    pub, e2e, extra_pubs = [], [], 0
    before = scrape()
    sum_total0 = cnt_total0 = None
    extra_svc = None
    for i in range(k + warmup):
        if i == warmup:
            sum_total0 = key(before, "publish_duration_seconds_sum")
            cnt_total0 = key(before, "publish_duration_seconds_count")
            log_off = os.path.getsize(log)
        g0 = key(before, "snapshot_generation")
        c0 = key(before, "publish_duration_seconds_count")
        s0 = key(before, "publish_duration_seconds_sum")
        kind = i % 4
        if kind == 1:
            extra_svc = rnd.randrange(n)
            op = lambda: zk.create("%s/svc-%d/member_extra" % (root, extra_svc), member(extra_svc, 200, 7000))
        elif kind == 3:
            op = lambda: zk.delete("%s/svc-%d/member_extra" % (root, extra_svc))
        else:
            # a port no earlier change of this run used: every setData really changes the member
            s, m = rnd.randrange(n), rnd.randrange(b)
            data = member(s, m, 20000 + (rnd_no * (k + warmup) + i) % 40000)
            path = "%s/svc-%d/member_%010d" % (root, s, m)
            op = lambda: zk.set(path, data)
        t0 = time.perf_counter()
        op()
        deadline = t0 + 10
        while True:
            after = scrape()
            t1 = time.perf_counter()
            if key(after, "snapshot_generation") > g0 and key(after, "publish_duration_seconds_count") > c0:
                break
            if t1 > deadline:
                raise SystemExit("change %d was not published within 10 s" % i)
            time.sleep(0.0002)
        dc = key(after, "publish_duration_seconds_count") - c0
        if i >= warmup:
            pub.append((key(after, "publish_duration_seconds_sum") - s0) / dc)
            e2e.append(t1 - t0)
            extra_pubs += int(dc) - 1
        before = after
        time.sleep(rnd.uniform(0.003, 0.008))
    time.sleep(0.05)
    end = scrape()
    mean = (key(end, "publish_duration_seconds_sum") - sum_total0) / max(1.0, key(end, "publish_duration_seconds_count") - cnt_total0)
    with open(log, "rb") as f:
        f.seek(log_off)
        text = f.read().decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    reads, totals = [], []
    for line in text.split("\n"):
        if "applied a change" in line:
            r = re.search(r"read_us=(\d+)", line)
            t = re.search(r"total_us=(\d+)", line)
            if r and t:
                reads.append(int(r.group(1)) / 1e6)
                totals.append(int(t.group(1)) / 1e6)
    return {
        "changes": len(pub), "extra_publishes": extra_pubs,
        "publish_mean": mean, "publish_p50": pct(pub, 50), "publish_p99": pct(pub, 99),
        "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99), "e2e_max": max(e2e),
        "e2e_over_50ms": sum(1 for x in e2e if x > 0.05),
        "read_p50": pct(reads, 50), "read_p99": pct(reads, 99),
        "src_total_p50": pct(totals, 50), "src_logged": len(reads),
    }

def median(xs):
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    h = len(xs) // 2
    return xs[h] if len(xs) % 2 else (xs[h - 1] + xs[h]) / 2

def report(path, sizes):
    rows = [json.loads(l) for l in open(path)]
    by = {n: [r for r in rows if r["n"] == n] for n in sizes}
    ms = lambda v: "%.3f ms" % (v * 1e3) if v < 0.01 else "%.1f ms" % (v * 1e3)
    fields = [
        ("fill ZooKeeper (zkctl fill, once)", lambda rs: "%.1f s" % rs[0]["fill_s"]),
        ("start-up: spawn to all services published", lambda rs: "%.2f s" % median([r["startup_s"] for r in rs])),
        ("daemon CPU during start-up (user+sys)", lambda rs: "%.2f s" % median([r["startup_cpu_s"] for r in rs])),
        ("ZooKeeper CPU during start-up", lambda rs: "%.2f s" % median([r["zk_cpu_s"] for r in rs])),
        ("resident memory after start-up (VmRSS)", lambda rs: "%.1f MB" % median([r["rss_kb"] / 1024 for r in rs])),
        ("peak resident memory (VmHWM, end of round)", lambda rs: "%.1f MB" % median([r["hwm_kb"] / 1024 for r in rs])),
        ("one change, publish: mean (sum/count)", lambda rs: ms(median([r["publish_mean"] for r in rs]))),
        ("one change, publish: p50", lambda rs: ms(median([r["publish_p50"] for r in rs]))),
        ("one change, publish: p99", lambda rs: ms(median([r["publish_p99"] for r in rs]))),
        ("one change, source re-read (log read_us): p50", lambda rs: ms(median([r["read_p50"] for r in rs]))),
        ("one change, source re-read: p99", lambda rs: ms(median([r["read_p99"] for r in rs]))),
        ("daemon CPU per change, all threads (change phase CPU / changes)", lambda rs: ms(median([r["change_cpu_s"] for r in rs]))),
        ("ZooKeeper write to new generation (e2e): p50", lambda rs: ms(median([r["e2e_p50"] for r in rs]))),
        ("ZooKeeper write to new generation (e2e): p99", lambda rs: ms(median([r["e2e_p99"] for r in rs]))),
        ("ZooKeeper write to new generation (e2e): max", lambda rs: ms(median([r["e2e_max"] for r in rs]))),
        ("changes slower than 50 ms end to end (all rounds)", lambda rs: "%d of %d" % (sum(r["e2e_over_50ms"] for r in rs), sum(r["changes"] for r in rs))),
    ]
    out = ["| figure (median of %d rounds) | %s | ratio %s/%s |" % (len(by[sizes[0]]), " | ".join("%d services" % n for n in sizes), sizes[-1], sizes[0]),
           "| --- | " + " | ".join("---" for _ in sizes) + " | --- |"]
    ratio_keys = {"one change, publish: mean (sum/count)": "publish_mean", "one change, publish: p50": "publish_p50",
                  "one change, publish: p99": "publish_p99", "ZooKeeper write to new generation (e2e): p50": "e2e_p50",
                  "one change, source re-read (log read_us): p50": "read_p50",
                  "resident memory after start-up (VmRSS)": "rss_kb",
                  "daemon CPU per change, all threads (change phase CPU / changes)": "change_cpu_s", "start-up: spawn to all services published": "startup_s"}
    for name, f in fields:
        cells = [f(by[n]) for n in sizes]
        ratio = ""
        if name in ratio_keys:
            k = ratio_keys[name]
            # ratio per round (same round, interleaved), then the median of those ratios
            rr = [a[k] / b[k] for a, b in zip(by[sizes[-1]], by[sizes[0]]) if b[k]]
            ratio = "%.2fx" % median(rr)
        out.append("| %s | %s | %s |" % (name, " | ".join(cells), ratio))
    extra = sum(r["extra_publishes"] for r in rows)
    logged = min(r["src_logged"] for r in rows)
    out.append("")
    out.append("Per round: " + "; ".join("N=%d publish mean %s" % (r["n"], " / ".join(ms(x["publish_mean"]) for x in by[r["n"]])) for r in [by[n][0] for n in sizes]) +
               ". Publishes beyond one per change: %d; fewest `applied a change` lines in a round: %d." % (extra, logged))
    print("\n".join(out))

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "startup":
        print("%.3f" % startup(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
    elif cmd == "changes":
        print(json.dumps(changes(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8]))))
    elif cmd == "report":
        report(sys.argv[2], [int(x) for x in sys.argv[3:]])
PY

cputime() { # utime+stime of a pid, in seconds
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

cat >"$WORK/zoo.cfg" <<EOF
tickTime=500
dataDir=$WORK/zk
clientPort=2181
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=
maxClientCnxns=0
EOF
java -Xmx1g -XX:+UseSerialGC -cp /usr/share/java/zookeeper.jar:/etc/zookeeper/conf \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zoo.cfg" >"$WORK/zk.log" 2>&1 &
ZKPID=$!
"$TARGET/examples/zkctl" 127.0.0.1:2181 wait

echo "load before: $(cat /proc/loadavg)" >&2
: >"$WORK/fill.txt"
for n in $SIZES; do
    t0=$(date +%s.%N)
    "$TARGET/examples/zkctl" 127.0.0.1:2181 "fill /scale-$n $n $B"
    t1=$(date +%s.%N)
    fill=$(awk -v a="$t0" -v b="$t1" "BEGIN { printf \"%.1f\", b - a }")
    echo "$n $fill" >>"$WORK/fill.txt"
    echo "filled /scale-$n ($n x $B) in ${fill}s" >&2
done

: >"$WORK/results.json"
round=0
while [ "$round" -lt "$ROUNDS" ]; do
    round=$((round + 1))
    for n in $SIZES; do
        rm -rf "$WORK/state"
        cat >"$WORK/discotech.toml" <<EOF
[dns]
listen = ["127.0.0.53:53"]
upstreams = []
[state]
dir = "$WORK/state"
[hook]
socket = "$WORK/hook.sock"
[admin]
socket = "$WORK/admin.sock"
[metrics]
listen = ["127.0.0.1:9253"]
[[source]]
kind = "zookeeper"
hosts = ["127.0.0.1:2181"]
root = "/scale-$n"
format = "serverset"
EOF
        LOG="$WORK/discotech-$n-$round.log"
        zk0=$(cputime "$ZKPID")
        t0=$(date +%s.%N)
        DISCOTECH_LOG=discotech=debug "$TARGET/discotech" serve --config "$WORK/discotech.toml" >"$LOG" 2>&1 &
        DPID=$!
        startup=$(python3 "$WORK/drive.py" startup "$n" "$t0" "$STARTUP_TIMEOUT") || { tail -20 "$LOG" >&2; exit 1; }
        dcpu=$(cputime "$DPID")
        zk1=$(cputime "$ZKPID")
        rss=$(status_kb "$DPID" VmRSS)
        c0=$(cputime "$DPID")
        if [ -n "${PERF:-}" ]; then
            perf record -q -F 499 -g -p "$DPID" -o "$WORK/perf-$n-$round.data" >/dev/null 2>&1 &
            PERFPID=$!
            sleep 0.5
        fi
        res=$(python3 "$WORK/drive.py" changes "/scale-$n" "$n" "$B" "$K" "$WARMUP" "$LOG" "$round") || { tail -20 "$LOG" >&2; exit 1; }
        hwm=$(status_kb "$DPID" VmHWM)
        c1=$(cputime "$DPID")
        if [ -n "${PERF:-}" ]; then
            kill -INT "$PERFPID"; wait "$PERFPID" 2>/dev/null || true; PERFPID=""
            echo "perf, N=$n round $round, change phase (self time by symbol):" >&2
            perf report -q -i "$WORK/perf-$n-$round.data" --no-children --sort sym 2>/dev/null | grep -v '^$' | grep -v '^ *|' | grep -v '^ *-' | head -25 >&2 || true
        fi
        kill "$DPID"
        wait "$DPID" 2>/dev/null || true
        DPID=""
        fill=$(awk -v n="$n" '$1 == n { print $2 }' "$WORK/fill.txt")
        line=$(echo "$res" | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(n=$n, round=$round, fill_s=$fill, startup_s=$startup, startup_cpu_s=$dcpu, zk_cpu_s=$zk1-$zk0, change_cpu_s=($c1-$c0)/($K+$WARMUP), rss_kb=$rss, hwm_kb=$hwm, loadavg=open('/proc/loadavg').read().split()[:3]); print(json.dumps(r))")
        echo "$line" >>"$WORK/results.json"
        echo "round $round N=$n: $line" >&2
    done
done
echo "load after: $(cat /proc/loadavg)" >&2
python3 "$WORK/drive.py" report "$WORK/results.json" $SIZES
