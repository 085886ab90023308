#!/usr/bin/env python3
"""The client half of tests/appliance.sh (stdlib only, loopback only).

Starts the server binary from its directory with an empty environment, measures the cold start (process
start to the first 200 answer to an embedding request), then embeds every reference case in one request
and compares each embedding with the reference (cosine >= 0.99999, max |delta| <= 1e-4). Exits 0 only if
every case passes. Meant to run inside a network namespace that has nothing but loopback.
"""
import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


def post(port, path, payload, timeout):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def cold_start(binary, port, deadline_s, log):
    """Milliseconds from spawning the server to its first 200 answer to an embedding request."""
    started = time.monotonic()
    server = subprocess.Popen(
        [binary, "serve", "--port", str(port)],
        cwd=os.path.dirname(binary),
        env={},
        stdout=log,
        stderr=log,
    )
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode} before answering; see its log")
        if time.monotonic() - started > deadline_s:
            server.kill()
            sys.exit(f"no answer within {deadline_s} s")
        try:
            status, _ = post(port, "/v1/embeddings", {"input": "hello"}, timeout=30)
            if status == 200:
                return server, (time.monotonic() - started) * 1000.0
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            time.sleep(0.002)


def compare(port, reference):
    cases = reference["cases"]
    status, body = post(port, "/v1/embeddings", {"input": [c["text"] for c in cases]}, timeout=120)
    if status != 200:
        sys.exit(f"the embedding request got {status}")
    worst_cosine, worst_diff, failures = 1.0, 0.0, []
    for case, item in zip(cases, sorted(body["data"], key=lambda d: d["index"])):
        got, want = item["embedding"], case["embedding"]
        if len(got) != len(want):
            failures.append(f"{case['id']}: {len(got)} dims, want {len(want)}")
            continue
        dot = sum(a * b for a, b in zip(got, want))
        cosine = dot / (math.sqrt(sum(a * a for a in got)) * math.sqrt(sum(b * b for b in want)))
        diff = max(abs(a - b) for a, b in zip(got, want))
        worst_cosine, worst_diff = min(worst_cosine, cosine), max(worst_diff, diff)
        if cosine < MIN_COSINE or diff > MAX_ABS_DIFF:
            failures.append(f"{case['id']}: cosine {cosine:.9f}, max |delta| {diff:.2e}")
    if len(body["data"]) != len(cases):
        failures.append(f"{len(body['data'])} embeddings for {len(cases)} inputs")
    return worst_cosine, worst_diff, failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--runs", type=int, default=3, help="cold starts to measure (the median is shown)")
    parser.add_argument("--log", required=True, help="where the server's output goes")
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()
    with open(args.reference) as f:
        reference = json.load(f)
    binary = os.path.abspath(args.binary)
    timings = []
    with open(args.log, "ab") as log:
        for run in range(args.runs):
            server, ms = cold_start(binary, args.port, args.deadline, log)
            timings.append(ms)
            try:
                if run == 0:
                    worst_cosine, worst_diff, failures = compare(args.port, reference)
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(f"cold start (spawn to first 200 embedding answer), {args.runs} runs: "
          f"median {statistics.median(timings):.0f} ms, all {', '.join(f'{t:.0f}' for t in timings)} ms")
    print(f"{len(reference['cases'])} reference cases: worst cosine {worst_cosine:.9f}, "
          f"worst max |delta| {worst_diff:.2e}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("appliance: OK")


if __name__ == "__main__":
    main()
