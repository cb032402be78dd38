#!/bin/sh
# What one HTTP health check costs: examples/checkcost.rs runs N checks in a row against a tiny
# HTTP server on 127.0.0.1 written on plain sockets, and prints the time per check. Given a
# commit, the same example is built against that commit's probe too (in a temporary git worktree,
# the example copied in) and the two run in turn, ROUNDS times. Results go to docs/performance.md
# by hand.
#
#   benches/health/run.sh              # this tree's probe
#   benches/health/run.sh 49de72e      # beside the probe of commit 49de72e
#
# Environment (defaults): N=2000 ROUNDS=3. Shares CARGO_TARGET_DIR (default target/), so only the
# crate itself is built twice.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${N:-2000}
ROUNDS=${ROUNDS:-3}
REV=${1:-}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK=$(mktemp -d)
cleanup() {
    if [ -d "$WORK/rev" ]; then git -C "$ROOT" worktree remove --force "$WORK/rev"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# build DIR NAME: the example of the tree in DIR, kept as $WORK/NAME.
build() {
    (cd "$1" && cargo build --release -q --example checkcost)
    cp "$CARGO_TARGET_DIR/release/examples/checkcost" "$WORK/$2"
}

build "$ROOT" checkcost-tree
if [ -n "$REV" ]; then
    git -C "$ROOT" worktree add -q --detach "$WORK/rev" "$REV"
    cp "$ROOT/examples/checkcost.rs" "$WORK/rev/examples/"
    build "$WORK/rev" checkcost-rev
fi
for _ in $(seq "$ROUNDS"); do
    printf '%-12s ' "this tree"
    "$WORK/checkcost-tree" "$N" | tee -a "$WORK/tree.out"
    if [ -n "$REV" ]; then
        printf '%-12s ' "$REV"
        "$WORK/checkcost-rev" "$N" | tee -a "$WORK/rev.out"
    fi
done
# The median over the rounds of each round's median.
summary() {
    sed 's/.*median \([0-9.]*\) us.*/\1/' "$WORK/$1.out" | sort -n |
        awk -v who="$2" '{ v[NR] = $1 } END { printf "%-12s median per check over %d rounds: %s us\n", who, NR, v[int((NR + 1) / 2)] }'
}
summary tree "this tree"
if [ -n "$REV" ]; then summary rev "$REV"; fi
