# Sourced by run.sh and wrk.sh. Two shared cores are noisy: before each round, `quiet` waits (up to
# QUIET_WAIT s) until the machine has been at least 85% idle for a second, so other people's builds
# and benchmarks do not land in ours.
QUIET_WAIT=${QUIET_WAIT:-120}
idle_pct() {
    set -- $(head -1 /proc/stat); t1=$(($2 + $3 + $4 + $5 + $6 + $7 + $8)); i1=$(($5 + $6))
    sleep 1
    set -- $(head -1 /proc/stat); t2=$(($2 + $3 + $4 + $5 + $6 + $7 + $8)); i2=$(($5 + $6))
    echo $(((i2 - i1) * 100 / (t2 - t1 + 1)))
}
quiet() {
    waited=0
    while [ "$(idle_pct)" -lt 85 ] && [ "$waited" -lt "$QUIET_WAIT" ]; do waited=$((waited + 1)); done
    [ "$waited" -ge "$QUIET_WAIT" ] && echo "warning: machine still busy after ${QUIET_WAIT}s" >&2
    return 0
}
