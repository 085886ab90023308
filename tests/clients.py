"""Drives the server with clients nobody here wrote: LangChain and LlamaIndex, their embedding classes
against /v1/embeddings and their rerankers against /v2/rerank (LangChain's CohereRerank), /v1/rerank
(LlamaIndex's JinaRerank) and /rerank (LlamaIndex's TEIRerank).

argv: base URL (http://127.0.0.1:PORT), the MiniLM reference JSON, rerank-tiny's expected.json, the
reranker's name. Checks every vector and score against sentence-transformers' and exits non-zero with a
message on any mismatch."""
import json
import math
import sys

base_url, reference_path, rerank_path, reranker_name = sys.argv[1:5]
cases = [c for c in json.load(open(reference_path))["cases"] if c["category"] in ("sentence", "word")]
texts = [c["text"] for c in cases]
rerank = json.load(open(rerank_path))
tolerance = rerank["tolerance"]


def check_vectors(vectors, how):
    assert len(vectors) == len(cases), (how, len(vectors))
    for case, got in zip(cases, vectors):
        want = case["embedding"]
        dot = sum(a * b for a, b in zip(got, want))
        cos = dot / math.sqrt(sum(a * a for a in got) * sum(b * b for b in want))
        worst = max(abs(a - b) for a, b in zip(got, want))
        assert cos >= 0.99999 and worst <= 1e-4, f"{how} {case['id']}: cosine {cos}, max diff {worst}"
    print(f"{how}: {len(vectors)} vectors match sentence-transformers")


def check_ranking(got, case, top_n, how):
    """got: (index, score) best first; the top_n of CrossEncoder.predict's scores for the case."""
    want = sorted(range(len(case["scores"])), key=lambda i: -case["scores"][i])[:top_n]
    assert [i for i, _ in got] == want, f"{how}: order {[i for i, _ in got]}, expected {want}"
    for i, score in got:
        assert abs(score - case["scores"][i]) <= tolerance, f"{how}: document {i}: {score} vs {case['scores'][i]}"


# ---- LangChain ---------------------------------------------------------------------------------------
from langchain_cohere import CohereRerank
from langchain_core.documents import Document
from langchain_openai import OpenAIEmbeddings

embeddings = OpenAIEmbeddings(model="all-MiniLM-L6-v2", base_url=base_url + "/v1", api_key="unused",
                              check_embedding_ctx_length=False)
check_vectors(embeddings.embed_documents(texts), "LangChain OpenAIEmbeddings.embed_documents")
check_vectors([embeddings.embed_query(t) for t in texts], "LangChain OpenAIEmbeddings.embed_query")

for c, case in enumerate(rerank["cases"]):
    documents = [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(case["documents"])]
    reranker = CohereRerank(base_url=base_url, cohere_api_key="unused", model=reranker_name, top_n=3)
    ranked = reranker.compress_documents(documents, case["query"])
    check_ranking([(d.metadata["i"], d.metadata["relevance_score"]) for d in ranked], case, 3,
                  f"LangChain CohereRerank case {c}")
print(f"LangChain CohereRerank: {len(rerank['cases'])} queries ranked as CrossEncoder.predict ranks them")

# ---- LlamaIndex --------------------------------------------------------------------------------------
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.postprocessor.jinaai_rerank import JinaRerank
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference as TEIRerank

embed = OpenAIEmbedding(model_name="all-MiniLM-L6-v2", api_base=base_url + "/v1", api_key="unused")
check_vectors(embed.get_text_embedding_batch(texts), "LlamaIndex OpenAIEmbedding.get_text_embedding_batch")

for c, case in enumerate(rerank["cases"]):
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(case["documents"])]
    jina = JinaRerank(base_url=base_url + "/v1", api_key="unused", model=reranker_name, top_n=3)
    ranked = jina.postprocess_nodes(nodes, query_str=case["query"])
    check_ranking([(int(n.node.id_), n.score) for n in ranked], case, 3, f"LlamaIndex JinaRerank case {c}")
    tei = TEIRerank(base_url=base_url, model_name=reranker_name, top_n=len(nodes))
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(case["documents"])]
    ranked = tei.postprocess_nodes(nodes, query_str=case["query"])
    check_ranking([(int(n.node.id_), n.score) for n in ranked], case, len(nodes), f"LlamaIndex TEIRerank case {c}")
print(f"LlamaIndex JinaRerank and TEIRerank: {len(rerank['cases'])} queries ranked as CrossEncoder.predict ranks them")
