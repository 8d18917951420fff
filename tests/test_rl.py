"""`lmsys rl`: GRPO on the built-in arithmetic task raises the mean reward of a tiny model on the
CPU (after a supervised warm start the run makes with `lmsys train`'s API); rewards and prompt
sources refuse bad input with a message that names the fix."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from common import tiny_config
from lmsys.config import ConfigError, ModelConfig
from lmsys.rl.loop import rl
from lmsys.rl.data import exact_match, load_reward, python_parses, regex_reward, score

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def arith_config(run_dir, mesh=None, steps=40, **top):
    """The arithmetic task on a tiny model: a warm start of 100 supervised steps, then GRPO with
    16 prompts x 8 samples per step, 2 updates per rollout."""
    return tiny_config(mesh or ONE, steps=steps, seq_len=16, run_dir=str(run_dir), model={"vocab_size": 32},
                       data={"format": "prompts", "source": "arithmetic"},
                       optimizer={"lr": 1e-3, "warmup_steps": 5, "min_lr_ratio": 1.0, "weight_decay": 0.0},
                       rl={"group_size": 8, "prompts_per_step": 16, "max_new_tokens": 3, "sft_steps": 100,
                           "updates_per_rollout": 2}, **top)


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rl") / "arith"
    return run_dir, rl(arith_config(run_dir), devices=jax.devices()[:1], progress=False)


def test_grpo_raises_the_reward_on_arithmetic(arith_run):
    run_dir, history = arith_run
    rewards = [h["reward_mean"] for h in history]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-10:])
    print(f"reward_mean: first 5 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.12, rewards
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 41))
    for key in ("reward_mean", "reward_std", "clip_fraction", "completion_length", "logprob_diff",
                "rollout_tokens_per_second", "train_tokens_per_second", "handover_s", "loss"):
        assert all(np.isfinite(r[key]) for r in logged), key
    assert all(r["logprob_diff"] < 1e-5 for r in logged)  # sampler and trainer agree (fp32, one device)
    assert all(1 <= r["completion_length"] <= 3 for r in logged)


def test_builtin_rewards():
    assert exact_match(["1+1="] * 3, ["2", " 2\n", "3"], answer=["2"] * 3) == [1.0, 1.0, 0.0]
    assert regex_reward(r"\d+$")(["p"] * 2, ["42", "x"]) == [1.0, 0.0]
    assert python_parses(["p"] * 3, ["x = 1", "```python\ndef f(:\n```", "```python\nimport os\n```"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match=r"rl.reward=exact_match needs a 'answer' column .* the rows have \['label'\]"):
        score(exact_match, "exact_match", [{"prompt": "p", "label": 1}], ["a", "b"], 2)


def test_custom_reward_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, completions, **row):\n"
        "    return [len(c) + row['bonus'][i] for i, c in enumerate(completions)]\n"
        "def bad(prompts, completions, **row):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = lambda spec: tiny_config(data={"format": "prompts", "source": "arithmetic"}, rl={"reward": spec})  # noqa: E731
    rows = [{"prompt": "a", "bonus": 10}, {"prompt": "b", "bonus": 20}]
    got = score(load_reward(cfg("my_rewards:score")), "my_rewards:score", rows, ["x", "yy", "z", ""], 2)
    np.testing.assert_array_equal(got, [11, 12, 21, 20])
    with pytest.raises(ConfigError, match=r"one finite number per completion: got 1 values for 4"):
        score(load_reward(cfg("my_rewards:bad")), "my_rewards:bad", rows, ["x"] * 4, 2)
    with pytest.raises(ConfigError, match=r"module 'my_rewards' has no 'nope'"):
        load_reward(cfg("my_rewards:nope"))
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_module'"):
        load_reward(cfg("no_such_module:f"))
    with pytest.raises(ConfigError, match=r"rl.reward.*must be exact_match, regex, python_parses or module:function"):
        cfg("nothing")
    with pytest.raises(ConfigError, match=r"mesh.sequence.*must be 1 for GRPO"):  # no load-balanced order
        tiny_config(data={"format": "prompts", "source": "arithmetic"}, mesh={"sequence": 2})


def test_prompt_jsonl_errors(tmp_path):
    from lmsys.rl.data import PromptSource

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "x"}\n')
    cfg = tiny_config(data={"format": "prompts", "source": str(path), "tokenizer": "t.json"})
    with pytest.raises(ConfigError, match=r"p.jsonl line 2 has no text column 'prompt' \(rl.prompt_field\)"):
        PromptSource(cfg)
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    rows = PromptSource(cfg).rows(0, 4)  # two epochs, each a seeded order of both
    assert sorted(r["prompt"] for r in rows[:2]) == sorted(r["prompt"] for r in rows[2:]) == ["1+1=", "2+2="]
    assert rows[0]["answer"] == str(int(rows[0]["prompt"][0]) * 2)
    from lmsys.rl.data import arithmetic_tokenizer

    path.write_text('{"prompt": "1+1="}\n{"prompt": "' + "1" * 20 + '="}\n')
    with pytest.raises(ConfigError, match=r"data.source prompt 2 \('1111.*is 21 tokens: it must be 1 to 13 "
                                          r"\(seq_len - rl.max_new_tokens\)"):
        PromptSource(cfg).check_lengths(arithmetic_tokenizer(), 13)


def test_sampler_and_trainer_logprobs_agree_across_meshes_without_recompiling(arith_run, tmp_path, monkeypatch):
    """Trainer on fsdp=4 x tensor=2, engine on tensor=2: after every update, each sampled token's
    log-prob from the engine's decode step equals the trainer's forward of the same row (1e-5,
    float32); after the first step neither the rollouts nor the hand-overs trace or compile
    anything (the checkpoint written at the last step is Orbax's)."""
    import lmsys.rl.loop as loop

    sft = arith_run[0] / "sft"
    cfg = arith_config(tmp_path / "mixed", {"data": 1, "fsdp": 4, "tensor": 2}, steps=3, init_from=str(sft))
    cfg = dataclasses.replace(cfg, model=ModelConfig(), rl=dataclasses.replace(cfg.rl, sft_steps=0, engine_tensor=2))
    traces, steps_begun, inside = [], [], []

    def on_event(event, _secs, **_):
        if event.endswith("jaxpr_trace_duration") and len(steps_begun) > 1 and inside:
            traces.append((len(steps_begun), inside[-1], event))

    def watched(name, fn):
        def call(*args):
            inside.append(name)
            try:
                return fn(*args)
            finally:
                inside.pop()
        return call

    rollout = loop.rollout
    monkeypatch.setattr(loop, "rollout", lambda engine, *a: (steps_begun.append(engine), watched(
        "rollout", rollout)(engine, *a))[1])
    monkeypatch.setattr(loop.Handover, "__call__", watched("handover", loop.Handover.__call__))
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        history = rl(cfg, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    engine = steps_begun[0]
    assert engine.rules.mesh.shape["tensor"] == 2 and engine.weights_version == 4  # set at start + 3 updates
    assert traces == []
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["logprob_diff_max"] < 1e-5, h
        assert h["grad_norm"] > 0  # the policy moved: steps 2 and 3 sample from updated weights


TIMINGS = ("rollout_s", "update_s", "handover_s", "rollout_tokens_per_second", "train_tokens_per_second")


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(arith_run, tmp_path):
    """`lmsys rl` killed with SIGKILL after step 3 (its last checkpoint: step 2), then re-run:
    steps 3 and 4 (rollouts drawn by the restored step's sampler seeds, from the restored policy
    and optimizer state, at the restored data position) equal an uninterrupted run's bit for bit,
    and so do the final weights."""
    import os
    import signal
    import subprocess
    import sys

    from common import subprocess_env
    from lmsys.checkpoint import FAULT_ENV, load_run

    env = subprocess_env(drop=(FAULT_ENV,))
    cwd = os.path.dirname(os.path.dirname(__file__))

    def run(run_dir, fault=None):
        cmd = [sys.executable, "-m", "lmsys.cli", "rl", "recipes/configs/grpo-arith.yaml", f"run_dir={run_dir}",
               f"init_from={arith_run[0] / 'sft'}", "model.preset=", "rl.sft_steps=0", "steps=4",
               "rl.prompts_per_step=8", "checkpoint.every=2", "--no-progress"]
        return subprocess.run(cmd, cwd=cwd, env={**env, **({FAULT_ENV: fault} if fault else {})},
                              capture_output=True, text=True, timeout=600)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "killed", "after_step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "from step 2" in resumed.stdout, resumed.stdout

    def records(run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in lines}

    want, got = records(tmp_path / "straight"), records(tmp_path / "killed")
    assert sorted(got) == [1, 2, 3, 4]  # the killed step 3 never logged; the resume logged 3 and 4
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]
    assert want[3]["grad_norm"] > 0 and want[3]["reward_std"] > 0  # real updates, not zero advantages
    (_, a, meta_a), (_, b, meta_b) = load_run(tmp_path / "straight"), load_run(tmp_path / "killed")
    assert meta_a["step"] == meta_b["step"] == 4 and meta_a["data_index"] == meta_b["data_index"] == 32
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_run_with_kl_serves_merged_weights(arith_run, tmp_path):
    """LoRA with rl.kl_beta > 0: the reference is the base (adapters off), so the KL is 0 while the
    adapters' B is still 0 and grows once they train; the engine serves the merged weights and
    its log-probs still equal the trainer's (unmerged) forward within 1e-5."""
    cfg = arith_config(tmp_path / "lora", steps=3, init_from=str(arith_run[0] / "sft"),
                       lora={"rank": 4, "alpha": 8.0, "targets": "all"})
    cfg = dataclasses.replace(cfg, model=ModelConfig(),
                              rl=dataclasses.replace(cfg.rl, sft_steps=0, kl_beta=0.1, updates_per_rollout=1))
    history = rl(cfg, devices=jax.devices()[:1], progress=False)
    assert history[0]["kl"] == 0.0 and history[1]["kl"] > 0 and history[2]["kl"] > 0
    assert all(h["logprob_diff_max"] < 1e-5 and h["grad_norm"] > 0 for h in history), history
