#!/usr/bin/env bash
# The appliance claim, checked: the static binary, copied alone into an empty directory and started with an
# empty environment in a network namespace that has nothing but loopback, serves embeddings that match the
# reference (tests/appliance_client.py does the requests and the comparison, and times the cold start).
#
# Usage: tests/appliance.sh [BINARY]   (default: the musl release build)
# Needs: root for `unshare -n` (or unprivileged user namespaces: then `unshare -rn` is used), `ip`, `file`,
# python3. Bounded: the whole run is killed after 300 s.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
binary=${1:-$root/target/x86_64-unknown-linux-musl/release/embedding-server}
reference=$root/../shared/reference/all-MiniLM-L6-v2.json

fail() { echo "appliance: FAIL: $*" >&2; exit 1; }
[ -x "$binary" ] || fail "no binary at $binary (build it: cargo build --release --target x86_64-unknown-linux-musl)"
[ -f "$reference" ] || fail "the shared reference data is missing: expected $reference"

# Static means no interpreter and no shared libraries at all.
description=$(file -L "$binary")
echo "$description"
case "$description" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) fail "$binary is not statically linked" ;;
esac
if ldd "$binary" 2>&1 | grep -q '=>'; then
  fail "ldd lists shared libraries for $binary"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/appliance"
cp "$binary" "$work/appliance/embedding-server"
echo "binary: $(stat -c %s "$work/appliance/embedding-server") bytes"

if [ "$(id -u)" = 0 ]; then
  isolate=(unshare --net)
else
  isolate=(unshare --map-root-user --net)
fi

# Inside the namespace: bring loopback up, prove there is no other interface, then run the client there.
timeout 300 "${isolate[@]}" bash -c '
  set -euo pipefail
  ip link set lo up
  others=$(ip -o link show | grep -v " lo:" || true)
  if [ -n "$others" ]; then echo "appliance: FAIL: the namespace has other interfaces: $others" >&2; exit 1; fi
  exec python3 "$1" --binary "$2" --reference "$3" --log "$4"
' appliance "$here/appliance_client.py" "$work/appliance/embedding-server" "$reference" "$work/server.log" || {
  echo "--- server log ---" >&2
  cat "$work/server.log" >&2 || true
  fail "see above"
}

# The directory still holds the binary alone: the server wrote nothing beside itself.
leftovers=$(ls -A "$work/appliance")
[ "$leftovers" = "embedding-server" ] || fail "the server left files beside itself: $leftovers"
