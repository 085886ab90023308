#!/usr/bin/env python3
"""Loads a directory written by `embedding-server export-models` with sentence-transformers and compares its
token ids and vectors with the server's (tests/st_export.rs writes them).

    python st_export_check.py MODEL_DIR SERVER_JSON

SERVER_JSON: {"tolerance": float, "cases": [{"text", "input_ids", "embedding", "prompt_name"?}]}.
Exits 1 naming the first case that differs.
"""

import json
import sys

import numpy as np
from sentence_transformers import SentenceTransformer


def main():
    model_dir, server_json = sys.argv[1:3]
    server = json.load(open(server_json))
    model = SentenceTransformer(model_dir, device="cpu")
    tolerance = server["tolerance"]
    worst = 0.0
    for i, case in enumerate(server["cases"]):
        prompt_name = case.get("prompt_name")
        prompt = model.prompts.get(prompt_name or model.default_prompt_name or "", "")
        ids = model.tokenize([prompt + case["text"]])["input_ids"][0].tolist()
        if ids != case["input_ids"]:
            sys.exit(f"case {i} ({case['text'][:40]!r}): sentence-transformers' ids {ids[:12]}... differ from "
                     f"the server's {case['input_ids'][:12]}...")
        vector = model.encode(case["text"], prompt_name=prompt_name, convert_to_numpy=True)
        diff = float(np.max(np.abs(vector - np.asarray(case["embedding"], dtype=np.float32))))
        worst = max(worst, diff)
        if diff > tolerance:
            sys.exit(f"case {i} ({case['text'][:40]!r}): max |diff| {diff:.3g} > {tolerance}")
    print(f"{model_dir}: {len(server['cases'])} cases, ids equal, max |diff| {worst:.3g} "
          f"(sentence-transformers {__import__('sentence_transformers').__version__})")


if __name__ == "__main__":
    main()
