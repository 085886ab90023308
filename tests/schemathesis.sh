#!/usr/bin/env bash
# Runs schemathesis (property-based API testing from the OpenAPI document) against the release binary on
# loopback, with every check, for a bounded time. Fails on any 5xx, schema violation or crash.
#   tests/schemathesis.sh                 (after cargo build --release)
#   SCHEMATHESIS_MAX_EXAMPLES=200 tests/schemathesis.sh   for a longer run
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/embedding-server
venv=target/schemathesis-venv
version=4.32.5
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-25}
time_limit=${SCHEMATHESIS_TIME_LIMIT:-600}

test -x "$binary" || { echo "error: $binary is missing; run cargo build --release first" >&2; exit 1; }
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

log=$(mktemp)
# The embedded model and a reranker (the shared rerank-tiny), so that every documented operation has a model.
"$binary" serve --host 127.0.0.1 --port 0 --model-dir ../shared/reference --model all-MiniLM-L6-v2 \
    --model rerank-tiny >"$log.out" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log" "$log.out"' EXIT

address=
for _ in $(seq 1 600); do
    address=$(sed -n 's|^listening on http://||p' "$log.out" | head -n1)
    [ -n "$address" ] && break
    kill -0 "$server" 2>/dev/null || { echo "error: the server exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$address" ] || { echo "error: the server did not print its address" >&2; exit 1; }
case "$address" in
    127.0.0.1:*) ;;
    *) echo "error: refusing to test a non-loopback address: $address" >&2; exit 1 ;;
esac
echo "schemathesis $version against http://$address (max $max_examples examples per operation)"

# One worker: with more, Python 3.11's ast module can fail in hypothesis' threads ("AST constructor
# recursion depth mismatch"), an error in the tool, not in the server.
status=0
timeout --signal=INT --kill-after=30 "$time_limit" \
    "$venv/bin/schemathesis" --no-color --config-file tests/schemathesis.toml run "http://$address/openapi.json" \
    --checks all \
    --max-examples "$max_examples" \
    --workers 1 \
    --request-timeout 60 \
    --seed "${SCHEMATHESIS_SEED:-1}" \
    || status=$?

if ! kill -0 "$server" 2>/dev/null; then
    echo "error: the server died during the run; its log:" >&2
    tail -n 50 "$log" >&2
    exit 1
fi
if grep -q "panicked" "$log"; then
    echo "error: a handler panicked during the run:" >&2
    grep -A3 "panicked" "$log" >&2
    exit 1
fi
[ "$status" -eq 0 ] || { echo "error: schemathesis failed (exit $status)" >&2; exit "$status"; }
echo "schemathesis: no failures"
