#!/usr/bin/env bash
# DNS benchmark: discotech serve against dnsmasq and unbound, loaded with the same 1,000 services.
#
#   benches/dns/run.sh                          # full run: 10 s loads, 5 interleaved rounds (~30 min)
#   DURATION=3 ROUNDS=3 benches/dns/run.sh      # quick look (~8 min)
#
# Builds discotech (cargo build --release), then re-executes itself inside a private network namespace
# (unshare -n; traffic only on its own loopback). There: an upstream unbound on 127.0.0.60 (CPU 1) that
# answers every name under upstream.test, and the servers under test on port 53 of their own addresses,
# each pinned to CPU 0 and forwarding to that upstream: discotech 127.0.0.53, dnsmasq 127.0.0.54,
# unbound 127.0.0.55, and dnsmasq-nosrv 127.0.0.56 (dnsmasq without the 2,000 --srv-host lines, which it
# walks on every query). dnsperf runs on CPU 1; every load stops by itself (dnsperf -l). Rounds are
# interleaved (discotech, dnsmasq, unbound, dnsmasq-nosrv, discotech, ...); the report gives medians and
# ratios to dnsmasq. Inputs come from gen.sh beside this script.
#
# Query mixes (MIXES):
#   service  A, AAAA and SRV for svc0000..svc0999.disco, answered from local data
#   warm     A for 100 forwarded names (name-N.upstream.test), repeated: answered from the forwarder's cache
#   cold     A for unique forwarded names, one pass (dnsperf -n 1): every query goes to the upstream
# Modes per mix: saturation (dnsperf -T 1 -c 8 -q 200 -l DURATION -S 1), and, unless EFFICIENCY=0, the
# same at a fixed rate (-Q RATE). CPU per query = the server's utime+stime (/proc/PID/stat, all threads)
# over the run divided by the queries completed. The cold mix is measured at saturation only.
#
# Two shared cores are noisy: before each round the script waits (up to QUIET_WAIT s) until the machine
# is at most QUIET_MAX% busy, and a run during which other programs took more than OTHER_MAX% of CPU 0
# is measured again (up to OTHER_RETRIES times). The report shows how much CPU 0 others took.
#
# Environment (defaults):
#   DURATION=10 ROUNDS=5 RATE=80000 EFFICIENCY=1 MIXES="service warm cold"
#   SERVERS="discotech dnsmasq unbound dnsmasq-nosrv"   COLD_NAMES=60000*DURATION (names per cold run)
#   QUIET_MAX=10 QUIET_WAIT=600 OTHER_MAX=5 OTHER_RETRIES=3
#   OUT=FILE         also write the markdown report to FILE (it always goes to stdout and $RESULTS)
#   RESULTS=DIR      raw logs, results.csv and report.md (default /tmp/discotech-dns-bench.<time>)
#   SKIP_BUILD=1     do not run cargo build --release first
#   DISCOTECH_BIN    default <repo>/target/release/discotech; DISCOTECH_WAIT=10 seconds to answer
#   BUSY_WAIT=1800   seconds to wait for another benchmark (dnsperf, wrk, *bench*, benches/) to finish
#   KEEP=1           keep the generated configs (the work dir is printed)
#
# discotech is skipped, with the reason, when its binary is missing or it does not answer
# `svc0000.disco A` within DISCOTECH_WAIT seconds; the other servers are still measured.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
RATE=${RATE:-80000}
EFFICIENCY=${EFFICIENCY:-1}
MIXES=${MIXES:-service warm cold}
SERVERS=${SERVERS:-discotech dnsmasq unbound dnsmasq-nosrv}
COLD_NAMES=${COLD_NAMES:-$((60000 * DURATION))}
SKIP_BUILD=${SKIP_BUILD:-0}
DISCOTECH_BIN=${DISCOTECH_BIN:-$REPO/target/release/discotech}
DISCOTECH_WAIT=${DISCOTECH_WAIT:-10}
BUSY_WAIT=${BUSY_WAIT:-1800}
KEEP=${KEEP:-0}
OUT=${OUT:-}

UPSTREAM_ADDR=127.0.0.60
declare -A ADDR=([discotech]=127.0.0.53 [dnsmasq]=127.0.0.54 [unbound]=127.0.0.55 [dnsmasq-nosrv]=127.0.0.56)
SERVER_CPU=0
CLIENT_CPU=1
DNSPERF_ARGS=(-T 1 -c 8 -q 200 -l "$DURATION" -S 1)

log() { printf '[dns-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Other benchmarks on this machine (dnsperf, wrk, *bench* programs, scripts under benches/), not ours:
# neither this script's ancestors (timeout ... run.sh) nor its descendants (subshells, our dnsperf).
ancestors() {
    local p=$$
    while ((p > 1)); do
        echo "$p"
        p=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $2 }')
    done
}
other_benchmarks() {
    ps -eo pid=,ppid=,args= | awk -v me=$$ -v mine="$(ancestors | tr '\n' ' ')" '
        { pid[NR] = $1; parent[$1] = $2; line[NR] = $0; args[NR] = $3 }
        END {
            n = split(mine, a, " "); for (i = 1; i <= n; i++) skip[a[i]] = 1
            for (r = 1; r <= NR; r++) {
                p = pid[r]; if (p in skip) continue
                for (q = parent[p]; q > 1 && q != me && hops++ < 64; q = parent[q]);
                hops = 0; if (q == me) continue
                k = split(args[r], w, "/"); cmd = w[k]
                if (cmd ~ /^(dnsperf|wrk|wrk2)$/ || cmd ~ /bench/ || line[r] ~ /bench[e]s\// || line[r] ~ /cargo [b]ench/) print line[r]
            }
        }'
}

# ---------------------------------------------------------------- outside the namespace: checks, build
if [[ -z ${DNSBENCH_IN_NETNS:-} ]]; then
    missing=()
    for tool in dnsperf:dnsperf dnsmasq:dnsmasq-base unbound:unbound dig:dnsutils \
        taskset:util-linux unshare:util-linux ip:iproute2 awk:gawk; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "${tool%%:*}" >/dev/null 2>&1 ||
            missing+=("${tool#*:}")
    done
    if ((${#missing[@]})); then
        die "missing tools; install them with: apt-get install -y $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
    fi
    (($(nproc) >= 2)) || die "needs 2 CPUs (servers on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU), found $(nproc)"
    [[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 && $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] ||
        die "DURATION and ROUNDS must be positive integers"

    # Two cores: never run alongside another benchmark.
    waited=0
    while busy=$(other_benchmarks) && [[ -n $busy ]]; do
        ((waited < BUSY_WAIT)) || die "another benchmark is still running after ${BUSY_WAIT}s: $busy"
        ((waited % 60)) || log "waiting for another benchmark to finish: $(head -1 <<<"$busy")"
        sleep 10
        waited=$((waited + 10))
    done

    if [[ " $SERVERS " == *" discotech "* && $SKIP_BUILD != 1 ]]; then
        log "cargo build --release --bin discotech (may wait for the cargo lock)"
        if ! (cd "$REPO" && cargo build --release --bin discotech >&2); then
            log "warning: cargo build failed; discotech will be skipped unless an older binary answers"
            DISCOTECH_BUILD_NOTE="cargo build --release failed at $(git -C "$REPO" rev-parse --short HEAD)"
            export DISCOTECH_BUILD_NOTE
        fi
    fi

    # What is measured is what cargo built now: the working tree, which may hold uncommitted work.
    DISCOTECH_VERSION="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    [[ ! -e $DISCOTECH_BIN ]] || DISCOTECH_VERSION+=", binary of $(date -u -r "$DISCOTECH_BIN" '+%Y-%m-%d %H:%M UTC')"
    export DISCOTECH_VERSION
    export RESULTS=${RESULTS:-/tmp/discotech-dns-bench.$(date +%Y%m%d-%H%M%S)}
    export DNSBENCH_IN_NETNS=1
    if ((EUID == 0)); then
        exec unshare -n -- bash "${BASH_SOURCE[0]}" "$@"
    fi
    # Not root: a user namespace maps us to root inside, enough to bind port 53 in our own netns.
    exec unshare -r -n -- bash "${BASH_SOURCE[0]}" "$@"
fi

# ---------------------------------------------------------------- inside the private network namespace
ip link set lo up
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/dns-bench-work.XXXXXX)
CSV=$RESULTS/results.csv
declare -A PID=()
declare -A SKIP_REASON=()

cleanup() {
    local p
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP == 1 ]]; then log "kept the generated inputs in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# utime+stime in clock ticks of a process (all its threads), from /proc/PID/stat.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# "busy total" ticks of one CPU line of /proc/stat ("cpu" = all CPUs, "cpu0" = CPU 0); busy counts steal.
cpu_sample() { awk -v c="$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
CLK_TCK=$(getconf CLK_TCK)

# "STATUS an/ns/ar BYTES" for one query, as dnsperf asks it (no EDNS).
answer_shape() {
    dig +noedns +time=1 +tries=1 @"$1" "$2" "$3" 2>/dev/null | awk '
        /status:/ { s = $6; sub(",", "", s) }
        /;; flags:/ { for (i = 1; i <= NF; i++) { if ($i == "ANSWER:") a = $(i+1); if ($i == "AUTHORITY:") n = $(i+1); if ($i == "ADDITIONAL:") r = $(i+1) } }
        /MSG SIZE/ { b = $NF }
        END { gsub(",", "", a); gsub(",", "", n); if (s == "") print "no answer"; else printf "%s %s/%s/%s %sB\n", s, a, n, r, b }'
}

# Wait until ADDR answers NAME A with an address; fails if the process exits or time runs out.
wait_ready() {
    local name=$1 addr=$2 qname=$3 deadline=$((SECONDS + $4))
    while ((SECONDS < deadline)); do
        kill -0 "${PID[$name]}" 2>/dev/null || return 1
        if dig +short +time=1 +tries=1 @"$addr" "$qname" A 2>/dev/null | grep -q '^[0-9]'; then return 0; fi
        sleep 0.2
    done
    return 1
}

start() { # start NAME CPU CMD...: the command runs pinned, its output in $RESULTS/NAME.log
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$RESULTS/$name.log" 2>&1 &
    PID[$name]=$!
}

log "generating 1,000 services and configs in $WORK"
"$HERE/gen.sh" "$WORK"

start upstream "$CLIENT_CPU" unbound -c "$WORK/upstream.conf"
wait_ready upstream "$UPSTREAM_ADDR" name-0.upstream.test 10 || die "upstream unbound did not start: $(tail -3 "$RESULTS/upstream.log")"

ACTIVE=()
for s in $SERVERS; do
    case $s in
    dnsmasq)
        start dnsmasq "$SERVER_CPU" dnsmasq --keep-in-foreground --pid-file= --conf-file="$WORK/dnsmasq.conf"
        wait_ready dnsmasq "${ADDR[dnsmasq]}" svc0000.disco 10 || die "dnsmasq did not start: $(tail -3 "$RESULTS/dnsmasq.log")"
        ;;
    dnsmasq-nosrv)
        start dnsmasq-nosrv "$SERVER_CPU" dnsmasq --keep-in-foreground --pid-file= --conf-file="$WORK/dnsmasq-nosrv.conf"
        wait_ready dnsmasq-nosrv "${ADDR[dnsmasq-nosrv]}" svc0000.disco 10 || die "dnsmasq-nosrv did not start: $(tail -3 "$RESULTS/dnsmasq-nosrv.log")"
        ;;
    unbound)
        start unbound "$SERVER_CPU" unbound -c "$WORK/unbound.conf"
        wait_ready unbound "${ADDR[unbound]}" svc0000.disco 10 || die "unbound did not start: $(tail -3 "$RESULTS/unbound.log")"
        ;;
    discotech)
        if [[ ! -x $DISCOTECH_BIN ]]; then
            SKIP_REASON[discotech]="binary $DISCOTECH_BIN not found${DISCOTECH_BUILD_NOTE:+ ($DISCOTECH_BUILD_NOTE)}"
        else
            start discotech "$SERVER_CPU" env -u RUST_LOG "$DISCOTECH_BIN" serve --config "$WORK/discotech.toml"
            if ! wait_ready discotech "${ADDR[discotech]}" svc0000.disco "$DISCOTECH_WAIT"; then
                if kill -0 "${PID[discotech]}" 2>/dev/null; then
                    SKIP_REASON[discotech]="did not answer svc0000.disco A on ${ADDR[discotech]} within ${DISCOTECH_WAIT}s"
                    kill "${PID[discotech]}" 2>/dev/null || true
                    wait "${PID[discotech]}" 2>/dev/null || true
                else
                    rc=0
                    wait "${PID[discotech]}" 2>/dev/null || rc=$?
                    last=$(grep -v '^\s*$' "$RESULTS/discotech.log" | tail -1 | cut -c1-160)
                    SKIP_REASON[discotech]="\`discotech serve --config ...\` exited with status $rc${last:+: $last}"
                fi
                unset 'PID[discotech]'
            fi
        fi
        ;;
    *) die "unknown server '$s' (known: discotech dnsmasq unbound dnsmasq-nosrv)" ;;
    esac
    if [[ -n ${SKIP_REASON[$s]:-} ]]; then
        log "SKIPPING $s: ${SKIP_REASON[$s]}"
    else
        ACTIVE+=("$s")
    fi
done
((${#ACTIVE[@]})) || die "no server to measure"
log "measuring: ${ACTIVE[*]} (pids: $(for s in "${ACTIVE[@]}"; do printf '%s=%s ' "$s" "${PID[$s]}"; done))"

# The shape of each server's answers, as dnsperf sees them: status answer/authority/additional size.
SHAPES=$RESULTS/shapes.txt
: >"$SHAPES"
for s in "${ACTIVE[@]}"; do
    for q in "svc0000.disco A" "svc0000.disco AAAA" "svc0000.disco SRV" "name-1.upstream.test A" "nosuch.disco A"; do
        read -r qname qtype <<<"$q"
        printf '%s\t%s\t%s\n' "$s" "$q" "$(answer_shape "${ADDR[$s]}" "$qname" "$qtype")" >>"$SHAPES"
    done
done

# Every server must give the answers it is meant to, or its figures mean nothing.
WARNINGS=()
if [[ -n ${DISCOTECH_BUILD_NOTE:-} && -z ${SKIP_REASON[discotech]:-} && " ${ACTIVE[*]} " == *" discotech "* ]]; then
    WARNINGS+=("$DISCOTECH_BUILD_NOTE: discotech is an older binary ($(date -r "$DISCOTECH_BIN" '+%Y-%m-%d %H:%M'))")
fi
for s in "${ACTIVE[@]}"; do
    while IFS=$'\t' read -r _ q shape; do
        case $s:$q in
        dnsmasq-nosrv:*SRV) expect='^NOERROR 0/' ;;
        *:nosuch.disco*) expect='^NXDOMAIN ' ;;
        *) expect='^NOERROR [1-9]' ;;
        esac
        if ! [[ $shape =~ $expect ]]; then
            WARNINGS+=("$s answers \`$q\` with \`$shape\`")
            log "WARNING: $s answers '$q' with '$shape'"
        fi
    done < <(awk -F'\t' -v s="$s" '$1 == s' "$SHAPES")
done

# run_load SERVER MIX MODE ROUND: one dnsperf run, one CSV line.
RUN_SEQ=0
echo "mix,mode,server,round,qps,completed,lost,cpu_ticks,cpu_us_per_query,avg_latency_s,response_bytes,noerror_pct,other_cpu0_pct" >"$CSV"
run_load() {
    local s=$1 mix=$2 mode=$3 round=$4 file extra=() t0 t1 logf c0 c1
    case $mix in
    service) file=$WORK/queries-service.txt ;;
    warm) file=$WORK/queries-warm.txt ;;
    cold)
        file=$WORK/queries-cold.txt
        RUN_SEQ=$((RUN_SEQ + 1)) # fresh names for every run, retries included
        "$HERE/gen.sh" cold "$file" "$RUN_SEQ" "$COLD_NAMES"
        extra=(-n 1)
        ;;
    esac
    [[ $mode == rate ]] && extra+=(-Q "$RATE")
    [[ $round == warmup ]] && extra+=(-l 1) # a later -l wins
    logf=$RESULTS/dnsperf-$mix-$mode-$s-$round.log
    c0=$(cpu_sample "cpu$SERVER_CPU")
    t0=$(cpu_ticks "${PID[$s]}")
    taskset -c "$CLIENT_CPU" dnsperf -s "${ADDR[$s]}" -d "$file" "${DNSPERF_ARGS[@]}" "${extra[@]}" >"$logf" 2>&1 || true
    t1=$(cpu_ticks "${PID[$s]}" 2>/dev/null) || die "$s died during the $mix/$mode load (see $RESULTS/$s.log)"
    c1=$(cpu_sample "cpu$SERVER_CPU")
    [[ $round == warmup ]] && return 0
    awk -v mix="$mix" -v mode="$mode" -v s="$s" -v r="$round" -v ticks=$((t1 - t0)) -v hz="$CLK_TCK" \
        -v c0="$c0" -v c1="$c1" '
        /Queries completed:/ { c = $3 }
        /Queries lost:/ { l = $3 }
        /Queries per second:/ { q = $4 }
        /Average Latency \(s\):/ { lat = $4 }
        /Average packet size:/ { b = $NF }
        /Response codes:/ { ok = 0; for (i = 3; i < NF; i++) if ($i == "NOERROR") { p = $(i+2); gsub(/[(%),]/, "", p); ok = p } }
        END {
            if (c == "" || q == "") { print "dnsperf gave no statistics" > "/dev/stderr"; exit 1 }
            # CPU 0 time not spent in the server: other programs (builds...) that distort the figure.
            split(c0, a, " "); split(c1, z, " ")
            other = (z[2] > a[2]) ? 100 * ((z[1] - a[1]) - ticks) / (z[2] - a[2]) : 0
            printf "%s,%s,%s,%s,%.0f,%d,%d,%d,%.3f,%s,%s,%s,%.1f\n", mix, mode, s, r, q, c, l, ticks,
                (c > 0 ? ticks * 1e6 / hz / c : 0), lat, b, ok + 0, (other > 0 ? other : 0)
        }' "$logf" >>"$CSV" || die "could not read $logf"
    tail -1 "$CSV" | awk -F, '{ printf "[dns-bench]   %-7s %-4s round %-2s %-13s %8s qps  %7s us/query  lost %-4s other load on CPU 0 %s%%\n", $1, $2, $4, $3, $5, $9, $7, $13 }' >&2
}

# Other programs on these 2 cores (a cargo build) distort every figure: wait for a quiet machine.
busy_pct() { # busy_pct SECONDS -> percent of all CPUs busy over that time
    local a b
    a=$(cpu_sample cpu)
    sleep "$1"
    b=$(cpu_sample cpu)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f\n", 100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}
QUIET_MAX=${QUIET_MAX:-10}
QUIET_WAIT=${QUIET_WAIT:-600}
OTHER_MAX=${OTHER_MAX:-5}         # a run whose CPU 0 was more than this % busy with other work ...
OTHER_RETRIES=${OTHER_RETRIES:-3} # ... is measured again, up to this many times
# Before each round: wait until no other benchmark runs (at most BUSY_WAIT s) and the CPUs are quiet
# (at most QUIET_WAIT s); past that, measure anyway and say so in the report.
wait_quiet() {
    local start=$SECONDS limit busy others why
    while true; do
        others=$(other_benchmarks)
        if [[ -n $others ]]; then
            why="another benchmark is running: $(head -1 <<<"$others" | cut -c1-100)"
            limit=$BUSY_WAIT
        else
            busy=$(busy_pct 2)
            ((busy > QUIET_MAX)) || return 0
            why="the machine is ${busy}% busy with other work (a build?)"
            limit=$QUIET_WAIT
        fi
        if ((SECONDS - start >= limit)); then
            WARNINGS+=("before a $1 round, ${why/[0-9]*% busy/busy}: measured anyway after waiting $limit s")
            log "WARNING: $why; measuring anyway"
            return 0
        fi
        log "pausing: $why"
        sleep 10
    done
}

started=$(date +%s)
for mix in $MIXES; do
    modes=(sat)
    [[ $EFFICIENCY == 1 && $mix != cold ]] && modes+=(rate)
    log "mix $mix: warm-up (1 s each, not recorded)"
    for s in "${ACTIVE[@]}"; do
        run_load "$s" "$mix" sat warmup
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        wait_quiet "$mix"
        for mode in "${modes[@]}"; do
            for s in "${ACTIVE[@]}"; do
                for ((try = 1; ; try++)); do
                    run_load "$s" "$mix" "$mode" "$r"
                    other=$(tail -1 "$CSV" | cut -d, -f13)
                    if ((try > OTHER_RETRIES)) || awk -v o="$other" -v m="$OTHER_MAX" 'BEGIN { exit !(o <= m) }'; then
                        break
                    fi
                    log "  other programs took ${other}% of CPU $SERVER_CPU: measuring this run again"
                    sed -i '$d' "$CSV"
                    wait_quiet "$mix"
                done
            done
        done
    done
    rm -f "$WORK/queries-cold.txt"
done
elapsed=$(($(date +%s) - started))

# ---------------------------------------------------------------- report
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) exit; print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
column_of() { # column_of MIX MODE SERVER COLUMN -> one value per round
    awk -F, -v m="$1" -v o="$2" -v s="$3" -v c="$4" 'NR > 1 && $1 == m && $2 == o && $3 == s { print $c }' "$CSV"
}
stat() { column_of "$@" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "–"; else printf "%.2f\n", a / b }'; }
fmt_k() { awk -v v="$1" 'BEGIN { if (v == "") print "–"; else printf "%.1fk", v / 1000 }'; }
fmt_us() { awk -v v="$1" 'BEGIN { if (v == "") print "–"; else printf "%.2f", v }'; }
version() {
    case $1 in
    discotech) echo "${DISCOTECH_VERSION:-unknown}" ;;
    dnsmasq) dnsmasq --version | awk 'NR == 1 { print $3 }' ;;
    unbound) unbound -V | awk 'NR == 1 { print $2 }' ;;
    esac
}

describe_mix() {
    case $1 in
    service) echo "A, AAAA and SRV for 1,000 services (local answers)" ;;
    warm) echo "A for 100 forwarded names, repeated (answered from each forwarder's cache)" ;;
    cold) echo "A for unique forwarded names, one pass (every query forwarded to the upstream unbound on CPU 1)" ;;
    esac
}

report() {
    local cpu_model
    cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $cpu_model, $(nproc) cores, Linux $(uname -r);"
    echo "discotech $(version discotech), dnsmasq $(version dnsmasq), unbound $(version unbound), dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ { print $2 }')."
    echo
    echo '```sh'
    echo "DURATION=$DURATION ROUNDS=$ROUNDS RATE=$RATE MIXES=\"$MIXES\" benches/dns/run.sh"
    echo "# each load: taskset -c $CLIENT_CPU dnsperf -s ADDR -d QUERIES -T 1 -c 8 -q 200 -l $DURATION -S 1 [-Q $RATE] [-n 1 for cold]"
    echo '```'
    echo
    echo "Each server alone on CPU $SERVER_CPU (\`taskset -c $SERVER_CPU\`, one thread where configurable), dnsperf on CPU $CLIENT_CPU;"
    echo "$ROUNDS interleaved rounds of ${DURATION} s per mix and mode, medians (min–max for QPS). \"× dnsmasq\" is"
    echo "the server's figure divided by dnsmasq's: above 1 is better for QPS, below 1 is better for CPU per query."
    echo "CPU per query is the server's utime+stime over the run divided by the queries answered, at saturation"
    echo "and at a fixed $RATE qps (\`-Q $RATE\`), where a server that falls short shows the rate it reached."
    if ((${#SKIP_REASON[@]})); then
        echo
        for s in "${!SKIP_REASON[@]}"; do echo "**$s not measured**: ${SKIP_REASON[$s]}."; done
    fi
    local w
    # The same warning once, with a count.
    for w in "${WARNINGS[@]}"; do echo "$w"; done | sort | uniq -c | while read -r n w; do
        echo
        echo "**Warning**: $w$( ((n == 1)) || echo " ($n times)")."
    done
    if [[ " ${ACTIVE[*]} " == *" dnsmasq-nosrv "* ]]; then
        echo
        echo "dnsmasq-nosrv is dnsmasq with the same A/AAAA records but none of the 2,000 \`--srv-host\` lines"
        echo "(SRV queries get an empty NOERROR); ratios stay against the full dnsmasq."
    fi
    local mix s q qmin qmax dq cpu_sat cpu_rate rate_qps d_cpu lost_sat bytes rate_cell mine noerr notes other qcell
    for mix in $MIXES; do
        echo
        echo "**$mix** — $(describe_mix "$mix")"
        echo
        echo "| server | QPS median (min–max) | QPS × dnsmasq | CPU µs/query, saturated | CPU µs/query @ $((RATE / 1000))k qps | CPU × dnsmasq | lost (sat.) | response bytes |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        notes=()
        dq=$(stat "$mix" sat dnsmasq 5)
        d_cpu=$(stat "$mix" rate dnsmasq 9)
        [[ -n $d_cpu ]] || d_cpu=$(stat "$mix" sat dnsmasq 9)
        for s in "${ACTIVE[@]}"; do
            q=$(stat "$mix" sat "$s" 5)
            qmin=$(column_of "$mix" sat "$s" 5 | sort -g | head -1)
            qmax=$(column_of "$mix" sat "$s" 5 | sort -g | tail -1)
            cpu_sat=$(stat "$mix" sat "$s" 9)
            cpu_rate=$(stat "$mix" rate "$s" 9)
            rate_qps=$(stat "$mix" rate "$s" 5)
            lost_sat=$(stat "$mix" sat "$s" 7)
            bytes=$(stat "$mix" sat "$s" 11)
            rate_cell=$(fmt_us "$cpu_rate")
            if [[ -n $rate_qps ]] && awk -v a="$rate_qps" -v r="$RATE" 'BEGIN { exit !(a < 0.97 * r) }'; then
                rate_cell="$rate_cell (reached $(fmt_k "$rate_qps"))"
            fi
            mine=${cpu_rate:-$cpu_sat}
            noerr=$(column_of "$mix" sat "$s" 12 | sort -g | head -1)
            if [[ -n $noerr ]] && awk -v p="$noerr" 'BEGIN { exit !(p < 99.9) }'; then
                notes+=("**Warning**: $s answered only $noerr% of the $mix queries with NOERROR in some round.")
            fi
            qcell="$(fmt_k "$q")"
            [[ -z $q ]] || qcell="$qcell ($(fmt_k "$qmin")–$(fmt_k "$qmax"))"
            echo "| $s | $qcell | $(ratio "$q" "$dq") | $(fmt_us "$cpu_sat") | $rate_cell | $(ratio "$mine" "$d_cpu") | ${lost_sat:-–} | ${bytes:-–} |"
        done
        other=$(awk -F, -v m="$mix" 'NR > 1 && $1 == m { print $13 }' "$CSV" | sort -g |
            awk '{ a[NR] = $1 } END { if (NR) printf "median %.1f%%, max %.1f%%", a[int((NR + 1) / 2)], a[NR] }')
        echo
        echo "CPU $SERVER_CPU time used by other programs during these runs: $other."
        if awk -F, -v m="$mix" -v o="$OTHER_MAX" 'NR > 1 && $1 == m && $13 > o { f = 1 } END { exit !f }' "$CSV"; then
            echo "**Some runs shared CPU $SERVER_CPU with other work (over ${OTHER_MAX}%): treat this table with care.**"
        fi
        for w in "${notes[@]}"; do echo; echo "$w"; done
    done
    echo
    echo "Answer shapes (status answer/authority/additional, bytes without EDNS), from \`dig +noedns\`:"
    echo
    echo "| query |$(printf ' %s |' "${ACTIVE[@]}")"
    echo "|---|$(printf -- '---|%.0s' "${ACTIVE[@]}")"
    local qn
    for qn in "svc0000.disco A" "svc0000.disco AAAA" "svc0000.disco SRV" "name-1.upstream.test A" "nosuch.disco A"; do
        printf '| %s |' "$qn"
        for s in "${ACTIVE[@]}"; do
            printf ' %s |' "$(awk -F'\t' -v s="$s" -v q="$qn" '$1 == s && $2 == q { print $3 }' "$SHAPES")"
        done
        echo
    done
}

report >"$RESULTS/report.md"
[[ -z $OUT ]] || cp "$RESULTS/report.md" "$OUT"
log "done in ${elapsed}s; raw logs and results.csv in $RESULTS${OUT:+; report written to $OUT}"
echo
cat "$RESULTS/report.md"
