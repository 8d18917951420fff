"""Hidden states of an HF-imported tiny Llama against transformers. Embeddings equal mean /
last pooling of transformers' last hidden state (after the final norm, as HF returns it), 8
inputs of different lengths in one request, in Python and over `POST /v1/embeddings` through the
`openai` client (base64 and float, `dimensions`, `usage`), pooling as the model's
sentence-transformers configuration says (read on import: modules.json's Pooling module or
1_Pooling/; an unimplemented mode a warning), the server's flag overriding. Captured activations (`forward(capture=
...)`: the residual stream after each block, attention and MLP outputs) equal transformers'
`output_hidden_states` and its layers' outputs, in Python and over completions'
`return_hidden_states`, without recompiling or changing the serving programs. Bad inputs are
400s naming the field."""

import base64
import dataclasses
import json
import logging

import httpx
import jax
import numpy as np
import pytest
from openai import OpenAI

from lmsys.interop import load_hf
from lmsys.config import ConfigError, from_dict
from lmsys.interop.hf_config import ConversionError, sentence_transformers_pooling
from lmsys.models import llama
from lmsys.serve.api import ChatBody, Limits
from lmsys.serve.constrained import all_allowed
from lmsys.serve.embeddings import Embedder
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.sampling import SamplingParams
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
    write_st_pooling(directory, "pooling_mode_mean_tokens")  # a sentence-transformers model pooling by mean
    params, cfg = load_hf(directory)
    assert cfg.embed_pooling == "mean"
    return model.eval(), params, cfg


def write_st_pooling(directory, *modes, path="1_Pooling", modules=True):
    """A sentence-transformers configuration beside an HF model: modules.json (Transformer,
    Pooling at `path`, Normalize) and the Pooling module's config.json with `modes` on."""
    if modules:
        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": path, "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / path).mkdir(exist_ok=True)
    all_modes = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken"]
    (directory / path / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, **{f"pooling_mode_{m}": f"pooling_mode_{m}" in modes for m in all_modes},
         "include_prompt": True}))


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
    assert Embedder(engine).pooling() == "mean" and Embedder(engine).pooling("last") == "last"
    background = BackgroundServer(create_app(engine, "tiny", engine.tokenizer))  # pools by the model's: mean
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
        # a sentence-transformers pooling lmsys does not implement: refused, never pooled otherwise
        model_cfg, engine.model = engine.model, dataclasses.replace(
            engine.model, embed_pooling="unsupported:pooling_mode_cls_token")
        try:
            resp = httpx.post(f"{background.url}/v1/embeddings", json={"input": "t1"}, timeout=60)
        finally:
            engine.model = model_cfg
        assert resp.status_code == 400 and "pooling_mode_cls_token" in resp.json()["error"]["message"]
        assert "--embed-pooling" in resp.json()["error"]["message"]
    finally:
        background.stop()


def test_sentence_transformers_pooling_is_read(tmp_path, caplog):
    cases = [(("pooling_mode_lasttoken",), {}, "last"), (("pooling_mode_mean_tokens",), {"path": "pool"}, "mean"),
             (("pooling_mode_lasttoken",), {"modules": False}, "last"),  # 1_Pooling/ without modules.json
             (("pooling_mode_cls_token",), {}, "unsupported:pooling_mode_cls_token"),
             (("pooling_mode_mean_tokens", "pooling_mode_max_tokens"), {},
              "unsupported:pooling_mode_max_tokens + pooling_mode_mean_tokens")]
    for i, (modes, kw, want) in enumerate(cases):
        directory = tmp_path / str(i)
        directory.mkdir()
        write_st_pooling(directory, *modes, **kw)
        with caplog.at_level(logging.WARNING, logger="lmsys.interop.hf_config"):
            caplog.clear()
            assert sentence_transformers_pooling(directory) == want, modes
        assert want.startswith("unsupported:") == ("not one lmsys implements" in caplog.text), caplog.text
    assert sentence_transformers_pooling(tmp_path) == ""  # a plain HF model
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(ConversionError, match="modules.json"):
        sentence_transformers_pooling(tmp_path)
    with pytest.raises(ConfigError, match="model.embed_pooling"):  # an lmsys run's own key
        from_dict({"model": {"embed_pooling": "cls"}})


def hf_hidden(model, ids):
    """transformers' output_hidden_states (embeddings, then each block's output; the last one
    after the final norm) and each layer's attention and MLP outputs, [n, T, D] each."""
    acts = {"attn": [], "mlp": []}
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: acts["attn"].append(o[0][0].numpy()))
             for layer in model.model.layers]
    hooks += [layer.mlp.register_forward_hook(lambda m, i, o: acts["mlp"].append(o[0].numpy()))
              for layer in model.model.layers]
    try:
        with torch.no_grad():
            hs = model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    return np.stack([h[0].numpy() for h in hs]), {k: np.stack(v) for k, v in acts.items()}


def test_captured_activations_equal_transformers(hf):
    model, params, cfg = hf
    ids = inputs()[-1]
    hs, acts = hf_hidden(model, ids)
    tokens = np.array([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    out, aux = jax.jit(lambda p, t, s: llama.forward(p, t, s, cfg=cfg, logits=False, capture=llama.CAPTURES))(
        params, tokens, positions)
    got = {k: np.asarray(v)[:, 0] for k, v in aux["captured"].items()}
    L = cfg.n_layers
    assert got["residual"].shape == (L, len(ids), cfg.d_model) and hs.shape[0] == L + 1
    np.testing.assert_allclose(got["residual"][:-1], hs[1:-1], rtol=1e-4, atol=1e-4)
    final = np.asarray(llama.rms_norm(got["residual"][-1], params["final_norm"], cfg.norm_eps))
    np.testing.assert_allclose(final, hs[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out)[0], hs[-1], rtol=1e-4, atol=1e-4)
    for kind in ("attn", "mlp"):  # 1e-4 of the tensor's scale (|values| up to ~20)
        assert np.abs(got[kind] - acts[kind]).max() <= 1e-4 * np.abs(acts[kind]).max(), kind
    with pytest.raises(ValueError, match="unknown activations.*'resid'"):
        llama.forward(params, tokens, positions, cfg=cfg, capture=("resid",))


def engine_decode_rows(engine):
    """The inputs of one all-padding decode call at the engine's one (batch-invariant) shape."""
    (B, P), = engine.decode_buckets
    z = np.zeros(B, np.int32)
    sampling = SamplingParams(np.zeros(B, np.float32), z, np.ones(B, np.float32), np.zeros(B, np.uint32), z)
    return z, z - 1, np.zeros((B, P), np.int32), sampling, np.zeros(B, bool), all_allowed(B, V), z  # z: LoRA slots


def test_http_hidden_states_and_serving_programs_unchanged(hf, engine):
    model, params, cfg = hf
    engine.warmup(progress=False)
    decode_hlo = engine._decode.lower(engine.params, engine.kv, engine_decode_rows(engine)).as_text()
    background = BackgroundServer(create_app(engine, "tiny", engine.tokenizer, limits=Limits(max_hidden_values=20000)))
    plain = {"prompt": [1, 2, 3], "max_tokens": 2}
    assert httpx.post(f"{background.url}/v1/completions", json=plain, timeout=60).status_code == 200
    compiled = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: compiled.append(record.getMessage())
    logging.getLogger("jax").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        url = background.url
        prompt = inputs()[4]
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0.5, "seed": 1, "n": 2, "logprobs": 0,
                "return_hidden_states": {"layers": list(range(cfg.n_layers)), "positions": "all"}}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            h = choice["hidden_states"]
            x = np.frombuffer(base64.b64decode(h["data"]), "<f4").reshape(h["shape"])
            generated = [int(t[1:]) for t in choice["logprobs"]["tokens"]]  # "t17" -> 17
            hs, _ = hf_hidden(model, prompt + generated)
            assert x.shape == (cfg.n_layers, hs.shape[1], cfg.d_model)
            np.testing.assert_allclose(x[:-1], hs[1:-1], rtol=1e-4, atol=1e-4)
            final = np.asarray(llama.rms_norm(x[-1], params["final_norm"], cfg.norm_eps))
            np.testing.assert_allclose(final, hs[-1], rtol=1e-4, atol=1e-4)
        last = httpx.post(f"{url}/v1/completions", json={**body, "n": 1, "return_hidden_states": {
            "layers": [1], "positions": "last", "kind": "mlp"}}, timeout=60).json()["choices"][0]["hidden_states"]
        assert last["shape"] == [1, 1, cfg.d_model]
        for extra, words in [({"layers": [cfg.n_layers]}, "layers are 0..2"), ({"layers": [0], "kind": "x"}, "kind"),
                             ({"layers": [0, 1, 2], "positions": "all"}, "at most 20000")]:
            resp = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 64 - len(prompt),
                                                             "return_hidden_states": extra}, timeout=60)
            assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
        background.stop()
    # the serving programs: not recompiled (only the capture call compiled), the same as before
    names = {m.split("Compiling ")[1].split()[0] for m in compiled if m.startswith("Compiling ")}
    assert "jit(activations)" in names and "jit(<lambda>)" not in names, names  # <lambda>: ModelCalls.jit's
    assert engine._decode.lower(engine.params, engine.kv, engine_decode_rows(engine)).as_text() == decode_hlo


def test_chat_hidden_states_equal_the_completions_path(engine):
    """`return_hidden_states` on chat: the rendered conversation's tokens then the generated
    ones, exactly what completions returns for the same prompt ids and sampling."""
    template = "{% for m in messages %}t1 {{ m.content }} t3 {% endfor %}t4"
    app = create_app(engine, "tiny", engine.tokenizer, chat_template=template, limits=Limits(max_hidden_values=20000))
    background = BackgroundServer(app)
    try:
        url, h = background.url, {"layers": [0, 2], "positions": "all"}
        messages = [{"role": "user", "content": "t5 t9 t11"}, {"role": "assistant", "content": "t7"},
                    {"role": "user", "content": "t20 t21"}]
        sampling = {"max_tokens": 4, "temperature": 0.7, "seed": 3, "ignore_eos": True, "return_hidden_states": h}
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **sampling}, timeout=60)
        assert chat.status_code == 200, chat.text
        ids = app.state.server._chat_items(ChatBody.model_validate({"messages": messages}))[1]
        assert ids == [1, 5, 9, 11, 3, 1, 7, 3, 1, 20, 21, 3, 4]
        completion = httpx.post(f"{url}/v1/completions", json={"prompt": ids, **sampling}, timeout=60).json()
        got, want = chat.json()["choices"][0], completion["choices"][0]
        assert got["message"]["content"] == want["text"] and got["hidden_states"] == want["hidden_states"]
        assert got["hidden_states"]["shape"] == [2, len(ids) + 4, engine.model.d_model]
        resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "stream": True, **sampling},
                          timeout=60)
        assert resp.status_code == 400 and "not with stream" in resp.json()["error"]["message"]
    finally:
        background.stop()
