#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what the tests need with apt-get
# (only when something is missing), then runs every test of the workspace, including the
# black-box tests that start discotech, dnsmasq and real clients inside private namespaces.
# Needs root (namespaces, port 53) and a Rust toolchain (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(dnsutils dnsmasq-base dnsperf iproute2 util-linux procps python3 gcc libc6-dev curl zookeeper default-jre-headless openjdk-17-jdk-headless nodejs nginx-light clang libbpf-dev golang-go busybox-static chromium fonts-dejavu-core systemd init-system-helpers dpkg-dev binutils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# systemd-resolved for the mode (b) packaging test, installed only into that test's scratch root (on the
# host it would take over /etc/resolv.conf); it must be the version of the installed systemd.
resolved_deb=target/packaging-test/systemd-resolved.deb
systemd_version=$(dpkg-query -W -f='${Version}' systemd)
if [ "$(dpkg-deb -f "$resolved_deb" Version 2>/dev/null)" != "$systemd_version" ]; then
    mkdir -p target/packaging-test
    (cd target/packaging-test && rm -f systemd-resolved_*.deb &&
        { apt-get download -qq "systemd-resolved=$systemd_version" 2>/dev/null ||
            { apt-get update -qq && apt-get download -qq "systemd-resolved=$systemd_version"; }; } &&
        mv systemd-resolved_*.deb systemd-resolved.deb)
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs) and re-run" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "the black-box tests need root (unshare, port 53): run as root or with sudo" >&2
    exit 1
fi

# The release binaries and the .deb (with the pinned cargo-deb, installed if missing), built here so
# the packaging tests find them fresh instead of compiling beside timing-sensitive tests.
packaging/build-deb.sh >/dev/null
# The layout: no import cycle between src modules, counted between files or between folders.
python3 tests/tools/modcycles.py src
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
