"""Times sentence-transformers on a corpus the way benches/engine.rs times the engine: in-process, batch 32,
best of two passes after a warm-up, at the model's max_seq_length (256 for all-MiniLM-L6-v2, set
explicitly so that a directory without sentence_bert_config.json is cut where the engine cuts). Prints
the best pass in seconds, nothing else.

(Named st_baseline.py, not sentence_transformers.py: a script of the package's own name, run from this
directory, would shadow the package and import itself.)

usage: python3 st_baseline.py MODEL_DIR CORPUS [MAX_SEQ_LENGTH]
"""

import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, corpus = sys.argv[1], sys.argv[2]
    max_seq_length = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with open(corpus, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_seq_length
    model.encode(lines[:64], batch_size=32)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        model.encode(lines, batch_size=32)
        best = min(best, time.perf_counter() - started)
    print(f"{best:.6f}")


if __name__ == "__main__":
    main()
