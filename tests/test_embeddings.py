"""Embeddings from an HF-imported tiny Llama equal mean / last pooling of transformers' last
hidden state (after the final norm, as HF returns it), 8 inputs of different lengths in one
request, in Python and over `POST /v1/embeddings` through the `openai` client (base64 and float,
`dimensions`, `usage`); bad inputs are 400s naming the field."""

import json

import httpx
import jax
import numpy as np
import pytest
from openai import OpenAI

from lmsys.interop import load_hf
from lmsys.serve.api import Limits
from lmsys.serve.embeddings import Embedder
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.server import BackgroundServer, create_app

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
V = 96
LENGTHS = [1, 3, 6, 11, 17, 24, 33, 40]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random transformers Llama (every tensor random) and its lmsys import."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    directory = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(directory, safe_serialization=True)
    params, cfg = load_hf(directory)
    return model.eval(), params, cfg


@pytest.fixture(scope="module")
def engine(hf):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, params, cfg = hf
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return Engine(params, cfg, tokenizer, EngineConfig(max_slots=4, page_size=8, max_seq_len=64, prefill_chunk=16,
                                                       batch_invariant=True), eos_token_id=0)


def inputs():
    rng = np.random.default_rng(0)
    return [rng.integers(1, V, n).tolist() for n in LENGTHS]


def reference(model, ids_list, pooling):
    """transformers' last_hidden_state of each input alone (no padding), pooled."""
    out = []
    with torch.no_grad():
        for ids in ids_list:
            h = model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
            out.append(h.mean(0) if pooling == "mean" else h[-1])
    return np.stack(out)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_hidden_states_equal_transformers(hf, engine, pooling):
    model, _, _ = hf
    got = Embedder(engine)(inputs(), pooling=pooling)
    np.testing.assert_allclose(got, reference(model, inputs(), pooling), rtol=1e-4, atol=1e-4)


def test_http_embeddings(hf, engine):
    model, _, cfg = hf
    background = BackgroundServer(create_app(engine, "tiny", engine.tokenizer, limits=Limits(embed_pooling="mean")))
    try:
        client = OpenAI(base_url=f"{background.url}/v1", api_key="none", max_retries=0, timeout=60)
        ref = reference(model, inputs(), "mean")
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        r = client.embeddings.create(model="tiny", input=inputs())  # the client asks for base64
        assert [d.index for d in r.data] == list(range(8))
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), ref, rtol=1e-4, atol=1e-5)
        assert (r.usage.prompt_tokens, r.usage.total_tokens) == (sum(LENGTHS), sum(LENGTHS))

        short = client.embeddings.create(model="tiny", input=inputs(), dimensions=8, encoding_format="float")
        cut = ref[:, :8] / np.linalg.norm(ref[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(np.array([d.embedding for d in short.data]), cut, rtol=1e-4, atol=1e-5)

        text = httpx.post(f"{background.url}/v1/embeddings", json={"input": "t5 t7 t9", "normalize": False},
                          timeout=60).json()
        np.testing.assert_allclose(text["data"][0]["embedding"], reference(model, [[5, 7, 9]], "mean")[0],
                                   rtol=1e-4, atol=1e-5)
        for body, param, words in [({"input": []}, "input", "empty"), ({"input": [[]]}, "input", "empty"),
                                   ({"input": [[V]]}, "input", "token ids"),
                                   ({"input": [list(range(1, 66))]}, "input", "at most 64"),
                                   ({"input": "t1", "dimensions": 65}, "dimensions", "64"),
                                   ({"input": "t1", "encoding_format": "hex"}, "encoding_format", ""),
                                   ({"input": "t1", "bogus": 1}, "bogus", "unknown")]:
            resp = httpx.post(f"{background.url}/v1/embeddings", json=body, timeout=60)
            err = resp.json()["error"]
            assert resp.status_code == 400 and err["param"] == param and words in err["message"], (body, err)
    finally:
        background.stop()
