"""Page recycling for a model whose every layer is windowed (lmsys.serve.window_pages): two
conversations of 10x the window run concurrently on a pool that holds about three windows (each
alone is longer than the whole pool), with outputs equal to a full recompute; pages are freed as
the windows move and none leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions, RequestError
from lmsys.serve.window_pages import free_before_window, live_pages, recycling_window

WINDOW, PAGE = 16, 4
MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
             sliding_window=WINDOW, init_std=0.3)


def test_which_pages_are_free():
    pages = list(range(10))
    # the next query at position 21 sees 6..21: pages 0 (0-3) and 1 (4-7) hold 6, 7 -> only 0 goes
    assert free_before_window(pages, 21, WINDOW, PAGE) == [0] and pages[:2] == [None, 1]
    assert free_before_window(pages, 21, WINDOW, PAGE) == []  # nothing twice
    assert free_before_window(pages, 29, WINDOW, PAGE) == [1, 2]  # sees 14..29: page 3 stays
    assert free_before_window(pages, 32, WINDOW, PAGE) == [3] and pages[4] == 4
    assert live_pages(1000, WINDOW, PAGE, 8) == 7 and live_pages(9, WINDOW, PAGE, 8) == 3
    gemma = from_dict({"model": dict(MODEL, global_every=2)}).model
    assert recycling_window(gemma) == 0  # a global layer reads the whole history


def test_long_conversations_on_a_pool_of_a_few_windows():
    cfg = from_dict({"model": MODEL}).model
    params = llama.init(jax.random.key(0), cfg)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    num_pages = 3 * WINDOW // PAGE  # 48 tokens; each conversation is 160
    engine = Engine(params, cfg, tokenizer, EngineConfig(  # one shape per call kind
        max_slots=2, page_size=PAGE, max_seq_len=192, prefill_chunk=8, num_pages=num_pages,
        batch_invariant=True))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, 64, n))) for n in (40, 27)]
    reqs = [engine.add_request(p, GenerationOptions(max_tokens=160 - len(p), ignore_eos=True,
                                                    logprobs=0))
            for p in prompts]
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.scheduler.pool.num_used)
    assert engine.scheduler.pool.num_free == num_pages  # every page back
    assert peak <= num_pages and engine.stats["preemptions"] == 0
    forward = jax.jit(lambda p, t: llama.forward(p, t, jnp.arange(t.shape[1])[None], cfg=cfg)[0])
    for prompt, req in zip(prompts, reqs):
        assert len(prompt) + len(req.generated) == 10 * WINDOW
        # full recompute: the whole conversation in one forward, no cache
        logp = np.asarray(jax.nn.log_softmax(forward(params, jnp.array([prompt + req.generated]))))[0]
        for i, token in enumerate(req.generated):
            pos = len(prompt) - 1 + i
            top2 = np.sort(logp[pos])[-2:]
            assert token == int(np.argmax(logp[pos])) or top2[1] - top2[0] < 1e-4, (i, token)
            assert req.token_logprobs[i] == pytest.approx(logp[pos, token], abs=1e-4)
    # without recycling the same request is refused: it needs 40 pages of a 12-page pool
    dense = from_dict({"model": dict(MODEL, sliding_window=0)}).model
    plain = Engine(llama.init(jax.random.key(0), dense), dense, tokenizer, EngineConfig(
        max_slots=2, page_size=PAGE, max_seq_len=192, prefill_chunk=8, num_pages=num_pages))
    with pytest.raises(RequestError, match="needs 40 KV pages but the pool has 12"):
        plain.add_request(prompts[0], GenerationOptions(max_tokens=120))
