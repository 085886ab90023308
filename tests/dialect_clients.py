"""Drives the server with the official client libraries of Ollama, Cohere and text-embeddings-inference
(`ollama`, `cohere`, `huggingface_hub`), unmodified; argv: the server's base URL, its API key, the shared
reference JSON.

Each client's vectors must equal what `/v1/embeddings` gives for the same texts (cosine >= 0.99999), and
those must be sentence-transformers' reference vectors; cutting an over-long text's start (Cohere's `START`,
huggingface_hub's `left`) must equal `/v1/embeddings`' `truncation_direction: left`. Cohere's `ubinary` must
be the sign bits of its floats. Ollama's `list()` must show the models. An
over-long input with each dialect's "no truncation" setting must come back as that client's error, parsed
from the dialect's error body, with the dialect's status. Exits non-zero with a message on any mismatch."""
import base64
import json
import math
import sys
import urllib.request
from importlib.metadata import version

import cohere
import numpy
import ollama
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

base_url, key, reference_path = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = "all-MiniLM-L6-v2"
cases = [c for c in json.load(open(reference_path))["cases"] if c["category"] in ("sentence", "word", "boundary")]
texts = [c["text"] for c in cases]
over_long = "word " * 400


def openai_vectors(inputs, **fields):
    request = urllib.request.Request(
        f"{base_url}/v1/embeddings",
        data=json.dumps({"model": MODEL, "input": inputs, **fields}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request) as response:
        return [d["embedding"] for d in json.load(response)["data"]]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check(vectors, want, how):
    vectors = [list(map(float, v)) for v in vectors]
    assert len(vectors) == len(want), (how, len(vectors), len(want))
    for i, (got, expected) in enumerate(zip(vectors, want)):
        assert len(got) == len(expected), f"{how} {i}: {len(got)} dims, not {len(expected)}"
        c = cosine(got, expected)
        assert c >= 0.99999, f"{how} {i}: cosine {c} with /v1/embeddings"


want = openai_vectors(texts)
for case, vector in zip(cases, want):
    c = cosine(vector, case["embedding"])
    assert c >= 0.99999, f"/v1/embeddings {case['id']}: cosine {c} with the reference"

# ---- ollama ----
client = ollama.Client(host=base_url, headers={"Authorization": f"Bearer {key}"})
check(client.embed(model=MODEL, input=texts).embeddings, want, "ollama embed")
check(client.embed(model=f"{MODEL}:latest", input=texts[0]).embeddings, want[:1], "ollama embed (one string, tagged)")
check([client.embeddings(model=MODEL, prompt=texts[0]).embedding], want[:1], "ollama embeddings")
listed = [m.model for m in client.list().models]
assert f"{MODEL}:latest" in listed, listed
try:
    client.embed(model=MODEL, input=over_long, truncate=False)
    sys.exit("ollama: an over-long input with truncate=False was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 400, e.status_code
    assert "256" in e.error and "{" not in e.error, f"ollama's error, parsed from {{'error'}}: {e.error}"
try:
    client.embed(model="no-such-model", input="x")
    sys.exit("ollama: an unknown model was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 404, e.status_code

# ---- cohere ----
co = cohere.ClientV2(api_key=key, base_url=base_url)
result = co.embed(model=MODEL, texts=texts, input_type="search_document", embedding_types=["float", "base64"])
check(result.embeddings.float_, want, "cohere float")
base64_vectors = [numpy.frombuffer(base64.b64decode(b), dtype="<f4") for b in result.embeddings.base64]
check(base64_vectors, want, "cohere base64")
assert result.meta.billed_units.input_tokens == sum(c["tokens"] for c in cases), result.meta
assert result.texts == texts
# ubinary: the sign bits of the float vectors, packed most significant bit first (numpy.packbits).
result = co.embed(model=MODEL, texts=texts, input_type="search_query", embedding_types=["float", "ubinary", "binary", "int8", "uint8"])
floats = numpy.array(result.embeddings.float_)
signs = numpy.packbits(floats > 0, axis=-1)
assert numpy.array_equal(numpy.array(result.embeddings.ubinary), signs), "ubinary is not the sign bits"
assert numpy.array_equal(numpy.array(result.embeddings.binary), signs.astype(numpy.int16) - 128), "binary"
for kind, low, high in (("int8", -128, 127), ("uint8", 0, 255)):
    values = numpy.array(getattr(result.embeddings, kind))
    assert values.shape == floats.shape and values.min() >= low and values.max() <= high, kind
check(result.embeddings.float_, want, "cohere float (search_query, no prompt for this model)")
long_text = [c for c in json.load(open(reference_path))["cases"] if c["category"] == "long"][0]["text"]
start = co.embed(model=MODEL, texts=[long_text], input_type="search_document", truncate="START")
end = co.embed(model=MODEL, texts=[long_text], input_type="search_document", truncate="END")
left, right = openai_vectors([long_text], truncation_direction="left"), openai_vectors([long_text])
check(start.embeddings.float_, left, "cohere truncate=START")
check(end.embeddings.float_, right, "cohere truncate=END")
try:
    co.embed(model=MODEL, texts=[over_long], input_type="search_query", truncate="NONE")
    sys.exit("cohere: an over-long input with truncate=NONE was accepted")
except cohere.errors.BadRequestError as e:
    assert e.status_code == 400, e.status_code
    assert "256" in e.body["message"], e.body

# ---- text-embeddings-inference, through huggingface_hub ----
hf = InferenceClient(base_url=base_url, api_key=key)
check(hf.feature_extraction(texts), want, "feature_extraction")
check(hf.feature_extraction(texts[0], truncate=True, truncation_direction="right"), want[:1], "feature_extraction (one)")
check(hf.feature_extraction(long_text, truncate=True, truncation_direction="left"), left, "feature_extraction left")
check(hf.feature_extraction(long_text, truncation_direction="right"), right, "feature_extraction right")
raw = hf.feature_extraction(texts[:3], normalize=False)
assert all(abs(numpy.linalg.norm(v) - 1) > 1e-3 for v in raw), "normalize=False gave unit vectors"
check(raw, want[:3], "feature_extraction normalize=False (direction)")
try:
    hf.feature_extraction(over_long, truncate=False)
    sys.exit("huggingface_hub: an over-long input with truncate=False was accepted")
except HfHubHTTPError as e:
    assert e.response.status_code == 422, e.response.status_code
    body = e.response.json()
    assert body["error_type"] == "Validation" and "256" in body["error"], body
    assert "256" in str(e), f"the client shows the server's message: {e}"

clients = ", ".join(f"{name} {version(name)}" for name in ("ollama", "cohere", "huggingface_hub"))
print(f"{clients}: {len(texts)} inputs matched /v1/embeddings and the reference")
