#!/usr/bin/env bash
# The HTTP figures: starts the release binary (built beforehand with `cargo build --release`; this script
# builds nothing) on a free port, runs ../shared/bench/load.py against it, prints each scenario's summary
# and stops the server.
#
#   benches/http.sh [SECONDS]     measured seconds per scenario (default 10, after a 2 s warm-up)
#
# Scenarios: batch 32 at concurrency 2 (throughput), a single input at concurrency 1 (latency) and at
# concurrency 8 (the batching queue merging concurrent requests).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
binary="${EMBEDDING_SERVER_BINARY:-$root/target/release/embedding-server}"
kit="$root/../shared/bench"
duration="${1:-10}"

[ -x "$binary" ] || { echo "no release binary at $binary: run cargo build --release first" >&2; exit 1; }
[ -f "$kit/load.py" ] || { echo "the shared bench kit is missing: expected $kit/load.py" >&2; exit 1; }

log="$(mktemp)"
"$binary" --port 0 --model all-MiniLM-L6-v2 >"$log" 2>/dev/null &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log"' EXIT

url=""
for _ in $(seq 1 300); do
    url="$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$log")"
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || { echo "the server exited before listening" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not start listening within 30 s" >&2; exit 1; }
echo "server: $binary at $url"

run() {
    local label="$1"; shift
    echo
    echo "== $label"
    python3 "$kit/load.py" --url "$url" --model all-MiniLM-L6-v2 --corpus "$kit/corpus.txt" \
        --duration "$duration" --warmup 2 "$@"
}

run "batch 32, concurrency 2" --batch 32 --concurrency 2
run "single input, concurrency 1" --batch 1 --concurrency 1
run "single input, concurrency 8" --batch 1 --concurrency 8
