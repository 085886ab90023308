"""Drives the server with the official `openai` package; argv: base URL, reference JSON path.

Checks float and base64 responses (the client's default asks for base64 and decodes it itself) against
sentence-transformers' reference vectors. Exits non-zero with a message on any mismatch."""
import base64
import json
import math
import struct
import sys

import openai

base_url, reference_path = sys.argv[1], sys.argv[2]
cases = [c for c in json.load(open(reference_path))["cases"] if c["category"] in ("sentence", "word", "boundary")]
texts = [c["text"] for c in cases]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def check(vectors, how):
    assert len(vectors) == len(cases), (how, len(vectors))
    for case, got in zip(cases, vectors):
        want = case["embedding"]
        dot = sum(a * b for a, b in zip(got, want))
        cos = dot / math.sqrt(sum(a * a for a in got) * sum(b * b for b in want))
        worst = max(abs(a - b) for a, b in zip(got, want))
        assert cos >= 0.99999 and worst <= 1e-4, f"{how} {case['id']}: cosine {cos}, max diff {worst}"


result = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
check([d.embedding for d in result.data], "float")
assert result.usage.prompt_tokens == sum(c["tokens"] for c in cases), result.usage

result = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
check([d.embedding for d in result.data], "default (base64 decoded by the client)")

result = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="base64")
raw = base64.b64decode(result.data[0].embedding)
check([list(struct.unpack("<384f", raw))] + [c["embedding"] for c in cases[1:]], "explicit base64")

try:
    client.embeddings.create(model="no-such-model", input="x")
    sys.exit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print(f"openai {openai.__version__}: {len(cases)} inputs matched the reference")
