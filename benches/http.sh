#!/usr/bin/env bash
# The HTTP figures beside their in-process baselines, from one run: first the engine in-process (through
# `cargo bench --bench engine -- --http-baseline P`, which builds the bench if needed): single inputs one at a
# time in corpus order, and batches of 32; then the release binary (built beforehand with
# `cargo build --release`) on a free port under ../shared/bench/load.py; then the ratios the issue sets
# targets for.
#
#   benches/http.sh [SECONDS] [PRECISION]    measured seconds per scenario (default 10, after a 2 s warm-up);
#                                            precision f32 (default), bf16 or int8
#
# Scenarios: batch 32 at concurrency 2 (throughput), a single input at concurrency 1 (latency) and at
# concurrency 8 (the batching queue merging concurrent requests).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
binary="${EMBEDDING_SERVER_BINARY:-$root/target/release/embedding-server}"
kit="$root/../shared/bench"
duration="${1:-10}"
precision="${2:-f32}"

[ -x "$binary" ] || { echo "no release binary at $binary: run cargo build --release first" >&2; exit 1; }
[ -f "$kit/load.py" ] || { echo "the shared bench kit is missing: expected $kit/load.py" >&2; exit 1; }

work="$(mktemp -d)"
log="$work/server.log"
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

echo "== in-process baselines ($precision)"
(cd "$root" && cargo bench --quiet --bench engine -- --http-baseline "$precision") | tee "$work/baseline.txt"
in_p50="$(sed -n 's/^in-process .* single input p50 ms: //p' "$work/baseline.txt")"
in_rate="$(sed -n 's/^in-process .* batch 32 inputs\/s: //p' "$work/baseline.txt")"

: >"$log"  # exists before the server's shell opens it, so that the first read below cannot fail
"$binary" --port 0 --model all-MiniLM-L6-v2 --precision "$precision" >"$log" 2>/dev/null &
server=$!
url=""
for _ in $(seq 1 300); do
    url="$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$log")"
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || { echo "the server exited before listening" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not start listening within 30 s" >&2; exit 1; }
echo
echo "server: $binary --precision $precision at $url"

run() {
    local name="$1" label="$2"; shift 2
    echo
    echo "== $label"
    python3 "$kit/load.py" --url "$url" --model all-MiniLM-L6-v2 --corpus "$kit/corpus.txt" \
        --duration "$duration" --warmup 2 --json "$work/$name.json" "$@"
}

run batch "batch 32, concurrency 2" --batch 32 --concurrency 2
run single1 "single input, concurrency 1" --batch 1 --concurrency 1
run single8 "single input, concurrency 8" --batch 1 --concurrency 8

echo
echo "== against the in-process baselines of this run"
python3 - "$work" "$in_p50" "$in_rate" <<'EOF'
import json, sys

work, in_p50, in_rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])


single1 = json.load(open(f"{work}/single1.json"))
single8 = json.load(open(f"{work}/single8.json"))
p50 = single1["latency_ms"]["p50"]
rate = single8["inputs_per_s"]
print(f"single input, concurrency 1: HTTP p50 {p50:.2f} ms, in-process {in_p50:.2f} ms: +{p50 - in_p50:.2f} ms (target ≤ +0.3 ms)")
print(f"single input, concurrency 8: {rate:.1f} inputs/s, in-process batch-32 {in_rate:.1f} inputs/s: {rate / in_rate:.2f} (target ≥ 0.85)")
EOF
