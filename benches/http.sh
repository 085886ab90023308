#!/usr/bin/env bash
# The HTTP figures beside their in-process baselines, from one run. It starts the release binary (built
# beforehand with `cargo build --release`) on a free port and leaves it idle while the engine runs
# in-process (`cargo bench --bench engine -- --http-baseline P`, which builds the bench if needed): single
# inputs one at a time, every corpus line once per pass, and batches of 32. Then ../shared/bench/load.py
# sends a single input at concurrency 1, every corpus line once, and the in-process baselines run again:
# the machine's speed drifts within a run, so the HTTP p50 is set against the mean of the two baselines
# around it, over the same inputs. Last, batch 32 at concurrency 2 (throughput) and a single input at
# concurrency 8 (the batching queue merging concurrent requests), and the ratios the issue sets targets for.
#
#   benches/http.sh [SECONDS] [PRECISION]    measured seconds of the batch-32 and concurrency-8 scenarios
#                                            (default 10, after a 2 s warm-up; concurrency 1 runs until it
#                                            has sent the corpus once); precision f32 (default), bf16 or int8
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

# load.py skips lines that are blank or only white space, as the engine bench does.
lines="$(grep -c '[^[:space:]]' "$kit/corpus.txt")"

: >"$log"  # exists before the server's shell opens it, so that the first read below cannot fail
"$binary" --port 0 --model all-MiniLM-L6-v2 --precision "$precision" >"$log" 2>"$work/server.err" &
server=$!
url=""
for _ in $(seq 1 300); do
    url="$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$log")"
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || {
        echo "the server exited before listening; it said:" >&2
        tail -n 20 "$work/server.err" >&2
        exit 1
    }
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not start listening within 30 s" >&2; exit 1; }
echo "server: $binary --precision $precision at $url"

baseline() {
    echo
    echo "== in-process baselines ($precision), $1"
    (cd "$root" && cargo bench --quiet --bench engine -- --http-baseline "$precision") | tee "$work/baseline-$1.txt"
}

run() {
    local name="$1" label="$2"; shift 2
    echo
    echo "== $label"
    python3 "$kit/load.py" --url "$url" --model all-MiniLM-L6-v2 --corpus "$kit/corpus.txt" \
        --warmup 2 --json "$work/$name.json" "$@"
}

baseline before
# Any $lines consecutive requests of one load.py worker cover every line once, wherever the warm-up ended.
run single1 "single input, concurrency 1 (every corpus line once)" --batch 1 --concurrency 1 \
    --max-requests "$lines" --duration 3600
baseline after
run batch "batch 32, concurrency 2" --batch 32 --concurrency 2 --duration "$duration"
run single8 "single input, concurrency 8" --batch 1 --concurrency 8 --duration "$duration"

echo
echo "== against the in-process baselines of this run"
python3 - "$work" <<'EOF'
import json, re, sys

work = sys.argv[1]


def baseline(when):
    text = open(f"{work}/baseline-{when}.txt").read()
    p50 = float(re.search(r"^in-process .* single input p50 ms: ([0-9.]+)$", text, re.M).group(1))
    rate = float(re.search(r"^in-process .* batch 32 inputs/s: ([0-9.]+)$", text, re.M).group(1))
    return p50, rate


(p50_a, rate_a), (p50_b, rate_b) = baseline("before"), baseline("after")
in_p50, in_rate = (p50_a + p50_b) / 2, (rate_a + rate_b) / 2
single1 = json.load(open(f"{work}/single1.json"))
single8 = json.load(open(f"{work}/single8.json"))
p50 = single1["latency_ms"]["p50"]
rate = single8["inputs_per_s"]
print(f"single input, concurrency 1: HTTP p50 {p50:.2f} ms over {single1['requests']} inputs, in-process "
      f"{in_p50:.2f} ms (before {p50_a:.2f}, after {p50_b:.2f}): {p50 - in_p50:+.2f} ms (target ≤ +0.3 ms)")
print(f"single input, concurrency 8: {rate:.1f} inputs/s, in-process batch-32 {in_rate:.1f} inputs/s (before "
      f"{rate_a:.1f}, after {rate_b:.1f}): {rate / in_rate:.2f} (target ≥ 0.85)")
EOF
