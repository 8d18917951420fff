"""DPO: preference JSONL rendered with the chat template (loss mask = the answer); the sigmoid
loss and rewards on a fixed batch equal the paper's formula computed here by hand, with the
reference being the base with adapters off (LoRA) or the frozen starting weights (full
fine-tuning); DPO training on a synthetic preference set drives reward accuracy above 0.9."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import synthetic_batch, tiny_config
from lmsys.config import ConfigError
from lmsys.models import llama, lora
from lmsys.parallel import Rules, build_mesh
from lmsys.train import Trainer
from lmsys.train import adapters
from test_finetune import CHATML, _ft_config, hf_dir  # noqa: F401  (the tiny HF Llama fixture)

BETA = 0.3
PAIRS = [("what is two plus two", "four", "two"), ("hello", "hi how are you", "good bye"),
         ("how are you", "fine thanks", "what"), ("what is the answer", "four", "see you later")]


def _logps_by_hand(params, batch, cfg):
    forward = jax.jit(lambda p, b: llama.forward(p, b["tokens"], b["positions"], b["segment_ids"], cfg=cfg.model)[0])
    logits = np.asarray(forward(params, batch), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tok = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return (tok * batch["loss_mask"]).sum(-1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dpo_loss_and_rewards_equal_the_papers_formula(mode):
    over = {"lora": {"rank": 4, "alpha": 8.0, "targets": "all"}} if mode == "lora" else {}
    cfg = tiny_config(data={"format": "preference", "tokenizer": "x.json"}, dpo={"beta": BETA}, **over)
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))
    params = trainer.init(cfg.seed)["params"]
    keys = iter(jax.random.split(jax.random.key(1), 64))
    if mode == "lora":  # random B: the policy differs from the base
        ad = lora.adapters_of(params)
        params = lora.with_adapters(params, {w: v if w in lora.EXTRA else {**v, "b": 0.1 * jax.random.normal(
            next(keys), v["b"].shape)} for w, v in ad.items()})
        policy, reference = lora.merge(params), lora.with_adapters(params, None)
    else:  # the trained weights moved away from the frozen copy
        moved = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape),
                             {k: v for k, v in params.items() if k != "dpo_reference"})
        params = {**moved, "dpo_reference": params["dpo_reference"]}
        policy, reference = moved, params["dpo_reference"]
    batch = synthetic_batch(cfg)
    loss, _, pairs, metrics = jax.jit(trainer.grads_and_metrics)(params, batch)

    with jax.default_matmul_precision("highest"):
        pi, ref = _logps_by_hand(policy, batch, cfg), _logps_by_hand(reference, batch, cfg)
    rc, rr = BETA * (pi[0::2] - ref[0::2]), BETA * (pi[1::2] - ref[1::2])
    expected_loss = np.mean(-np.log(1 / (1 + np.exp(-(rc - rr)))))
    assert int(pairs) == cfg.batch_size // 2
    np.testing.assert_allclose(float(loss), expected_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), rc.mean(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(metrics["rewards_rejected"]), rr.mean(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(metrics["reward_margin"]), (rc - rr).mean(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), (rc > rr).mean(), atol=1e-6, rtol=0)
    assert abs(expected_loss - np.log(2)) > 1e-3  # policy != reference: not the trivial log 2


def _write_prefs(path, repeat=4):
    lines = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] * repeat
    lines[1] = {"messages": [{"role": "user", "content": PAIRS[1][0]}], "chosen": [
        {"role": "assistant", "content": PAIRS[1][1]}], "rejected": {"role": "assistant", "content": PAIRS[1][2]}}
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_preference_rows_mask_the_answers(hf_dir, tmp_path):
    from lmsys.data import load_tokenizer
    from lmsys.data.preference import build_preference_dataset

    tok = load_tokenizer(str(hf_dir / "tokenizer.json"), 64)
    ds = build_preference_dataset(_write_prefs(tmp_path / "p.jsonl", 1), tok, CHATML, seq_len=32, seed=0,
                                  cache_dir=str(tmp_path), shuffle=False)
    batch = ds.batch(0, 8)
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        for row, answer in ((2 * i, chosen), (2 * i + 1, rejected)):
            trained = batch["targets"][row][batch["loss_mask"][row] == 1]
            assert tok.decode(trained.tolist(), skip_special_tokens=False).split() == answer.split() + ["<|im_end|>"]
            assert prompt.split()[0] in tok.decode(batch["tokens"][row].tolist())
    shuffled = build_preference_dataset(_write_prefs(tmp_path / "p.jsonl", 1), tok, CHATML, seq_len=32, seed=3,
                                        cache_dir=str(tmp_path))
    rows = [shuffled.row_index(g) for g in range(8)]
    assert sorted(rows) == list(range(8)) and all(rows[g] // 2 == rows[g + 1] // 2 for g in range(0, 8, 2))


def test_dpo_training_raises_reward_accuracy(hf_dir, tmp_path):
    from lmsys.train.loop import train

    cfg = _ft_config(hf_dir, tmp_path, steps=6, dpo={"beta": 0.5}, optimizer={"lr": 2e-2, "warmup_steps": 0},
                     lora={"rank": 4, "alpha": 8.0, "targets": "all"})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, format="preference", source=_write_prefs(tmp_path / "prefs.jsonl")))
    history = train(cfg, progress=False)
    assert history[0]["reward_accuracy"] <= 0.75 and abs(history[0]["reward_margin"]) < 1e-5  # starts at the base
    assert history[-1]["reward_accuracy"] > 0.9 and history[-1]["reward_margin"] > 0, history[-1]
    assert history[-1]["loss"] < history[0]["loss"]


def test_dpo_config_errors():
    with pytest.raises(ConfigError, match="'batch_size' = 6: DPO needs whole"):
        tiny_config(batch_size=6, grad_accum=2, data={"format": "preference", "tokenizer": "x.json"})
    with pytest.raises(ConfigError, match="'dpo.beta' = 0"):
        tiny_config(dpo={"beta": 0})
    with pytest.raises(ConfigError, match="data.format=preference needs the model's tokenizer"):
        tiny_config(data={"format": "preference"})


def test_dpo_recipe_resolves(hf_dir, tmp_path):
    from test_finetune import ROOT

    from lmsys.config import load_config
    from lmsys.train.loop import resolve_init_from

    cfg = resolve_init_from(load_config(ROOT / "recipes/configs/dpo.yaml", [
        f"init_from={hf_dir}", f"data.source={_write_prefs(tmp_path / 'p.jsonl')}", f"run_dir={tmp_path / 'run'}"]))
    assert (cfg.data.format, cfg.dpo.beta, cfg.lora.rank) == ("preference", 0.1, 16)
