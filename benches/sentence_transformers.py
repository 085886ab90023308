"""Times sentence-transformers on a corpus the way benches/engine.rs times the engine: in-process, batch 32,
best of two passes after a warm-up. Prints the best pass in seconds, nothing else.

usage: python3 sentence_transformers.py MODEL_DIR CORPUS
"""

import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, corpus = sys.argv[1], sys.argv[2]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with open(corpus, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(lines[:64], batch_size=32)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        model.encode(lines, batch_size=32)
        best = min(best, time.perf_counter() - started)
    print(f"{best:.6f}")


if __name__ == "__main__":
    main()
