#!/usr/bin/env bash
# Builds the release binaries (the daemon and the hook cdylib) and the Debian package with cargo-deb.
# Prints the path of the .deb on its last line (the -dbgsym .ddeb is written beside it). Installs the pinned cargo-deb first if it is missing.
#   packaging/build-deb.sh            -> target/debian/discotech_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

# cargo-deb's own build would leave out the hook: it is a cdylib of another workspace member.
cargo build --release -p discotech -p discotech-hook >&2
# Stripped binaries in the .deb; their debug info in discotech-dbgsym_*.ddeb beside it.
cargo deb --no-build -p discotech --dbgsym --compress-debug-symbols=zlib >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
version=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "discotech"))')
deb="$target_dir/debian/discotech_${version}-1_$(dpkg --print-architecture).deb"
test -f "$deb" || { echo "build-deb.sh: expected $deb" >&2; exit 1; }
echo "$deb"
