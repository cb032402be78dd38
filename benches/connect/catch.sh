#!/bin/sh
# The catch path end to end: wrk, not hooked, against nginx directly, through the daemon's BPF catch
# path (wrk connects to web's magic address; the kernel sends the connect to nginx inside
# connect()), and through a local HAProxy, with keep-alive and "Connection: close". The same run as
# benches/connect/wrk.sh, with the catch path in place of the hook.
#
#   benches/connect/catch.sh          # ROUNDS=3 DURATION=5s CONNS=50 PORT=18080
VIA=catch exec sh "$(dirname "$0")/wrk.sh" "$@"
