#!/usr/bin/env python3
"""Compact vectors against sentence-transformers itself. Run by tests/compact.rs (ignored by default):

    python tests/compact_vectors.py http://127.0.0.1:PORT ../shared/reference/all-MiniLM-L6-v2.json

1. For every reference text, the server's int8, uint8, binary and ubinary vectors equal
   `sentence_transformers.quantize_embeddings` of the server's own float vectors, with the ranges the server
   publishes at /v1/models/{id}/quantization: exactly.
2. Against the reference's floats (sentence-transformers' own embeddings, which ours match within 1e-4), the
   scalar buckets differ by at most one step and the sign bits only where the value is within 1e-4 of 0.
3. Hamming distance on the server's ubinary ranks the reference texts as it does on
   `quantize_embeddings(reference floats, "ubinary")`, query by query.
Prints a summary; exits non-zero with a message on the first mismatch.
"""

import json
import sys
import urllib.request

import numpy as np
from sentence_transformers import quantize_embeddings

PRECISIONS = ("int8", "uint8", "binary", "ubinary")


def call(base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def embed(base, texts, encoding_format):
    body = call(base, "/v1/embeddings", {"input": texts, "encoding_format": encoding_format})
    return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]


def hamming(packed):
    bits = np.unpackbits(packed, axis=1).astype(np.int32)
    return (bits[:, None, :] != bits[None, :, :]).sum(axis=2)


def ranking(distances, query):
    """The other texts by distance from `query`, ties broken by index (a stable sort)."""
    order = np.argsort(distances[query], kind="stable")
    return [int(j) for j in order if j != query]


def fail(message):
    print("FAIL: " + message)
    sys.exit(1)


def main():
    base, reference_path = sys.argv[1].rstrip("/"), sys.argv[2]
    reference = json.load(open(reference_path, encoding="utf-8"))
    model = reference["model"]
    texts = [case["text"] for case in reference["cases"]]
    ours = np.array(embed(base, texts, "float"), dtype=np.float32)
    theirs = np.array([case["embedding"] for case in reference["cases"]], dtype=np.float32)
    dims = ours.shape[1]

    published = call(base, f"/v1/models/{model}/quantization")
    entry = next((r for r in published["ranges"] if r["dimensions"] == dims), None)
    if entry is None:
        fail(f"/quantization publishes no ranges for {dims} dimensions")
    ranges = np.array([entry["min"], entry["max"]], dtype=np.float32)

    for precision in PRECISIONS:
        served = np.array(embed(base, texts, precision))
        expected = quantize_embeddings(ours, precision=precision, ranges=ranges)
        if served.shape != expected.shape:
            fail(f"{precision}: shape {served.shape}, sentence-transformers gives {expected.shape}")
        if not np.array_equal(served.astype(np.int64), expected.astype(np.int64)):
            where = np.argwhere(served != expected)[0]
            fail(f"{precision}: differs at {tuple(where)}: {served[tuple(where)]} vs {expected[tuple(where)]}")

        from_reference = quantize_embeddings(theirs, precision=precision, ranges=ranges).astype(np.int64)
        if precision.endswith("int8"):
            steps = np.abs(served.astype(np.int64) - from_reference)
            if steps.max() > 1:
                fail(f"{precision}: {steps.max()} steps from the reference's floats")
            print(f"{precision}: equal to quantize_embeddings; {np.mean(steps == 0):.4%} equal on the reference's floats")
        else:
            flipped = np.unpackbits((served.astype(np.int64) ^ from_reference).astype(np.uint8), axis=1)
            near_zero = np.abs(theirs) < 1e-4
            if np.any(flipped.astype(bool) & ~near_zero):
                fail(f"{precision}: a sign bit differs from the reference's where the value is not near 0")
            print(f"{precision}: equal to quantize_embeddings; {int(flipped.sum())} bits differ on the reference's floats")

    served = np.array(embed(base, texts, "ubinary"), dtype=np.uint8)
    ours_d = hamming(served)
    theirs_d = hamming(quantize_embeddings(theirs, precision="ubinary"))
    exact = 0
    for query in range(len(texts)):
        ours_r, theirs_r = ranking(ours_d, query), ranking(theirs_d, query)
        if ours_r == theirs_r:
            exact += 1
            continue
        # Only a flipped near-zero bit can separate the two: every neighbour must stay within that many places.
        flips = int(np.abs(ours_d[query] - theirs_d[query]).max())
        positions = {j: i for i, j in enumerate(theirs_r)}
        for i, j in enumerate(ours_r):
            lo, hi = ours_d[query][j] - flips, ours_d[query][j] + flips
            tied = [k for k in theirs_r if lo <= theirs_d[query][k] <= hi]
            if j not in tied:
                fail(f"query {query}: neighbour {j} at place {i} here, {positions[j]} in Python")
    print(f"ubinary Hamming ranking: {exact}/{len(texts)} queries rank identically, the rest within flipped bits")

    top1 = sum(ranking(ours_d, q)[0] == ranking(theirs_d, q)[0] for q in range(len(texts)))
    print(f"top-1 Hamming neighbour identical for {top1}/{len(texts)} queries")
    print("OK")


if __name__ == "__main__":
    main()
