"""`lmsys rl`: GRPO in one process. The serving engine samples from the trainer's current weights,
the rewards score the samples, the trainer updates, and the engine is handed the new weights.

    from lmsys.config import load_config
    from lmsys.rl.loop import rl
    history = rl(load_config("recipes/configs/grpo-arith.yaml", ["steps=20"]))

Each step: rl.prompts_per_step prompts from data.source (data_index advances by that many), G =
rl.group_size samples of each from the Engine (rl.temperature, rl.top_p; request k of step s
samples with the seed of (seed, s, k), so the sampler's randomness is a function of the step and
a resumed run draws the same samples), rewards, group advantages (lmsys.train.grpo), the trainer's
log-probs of the samples before the update (the ratio's denominator; `logprob_diff` is their mean
absolute difference from the sampler's), rl.updates_per_rollout optimizer steps on that batch,
then the hand-over: the new policy resharded on device from the training mesh onto the engine's
(tensor = rl.engine_tensor) and `Engine.set_params`, timed as `handover_s`. With LoRA the engine
serves the merged weights (base + scale A B, one jitted merge per hand-over): the decode step then
runs the plain model's compiled shapes, with no adapter-bank gather per token.

Checkpoints (checkpoint.every, the last step, SIGTERM/SIGINT) are the training run's: the policy
(with LoRA its adapters) and optimizer state, the data position in the meta; the frozen reference
is init_from's weights (or the seed's init), loaded again and checked by hash on resume. Re-running
the same command resumes; the next updates equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from lmsys.checkpoint import Checkpointer, fault_point, make_meta, path_or_url
from lmsys.config import Config, ConfigError, MeshConfig, ModelConfig, save_config
from lmsys.models import llama, lora
from lmsys.parallel import Rules, build_mesh
from lmsys.train.grpo import GrpoTrainer, group_advantages
from lmsys.train.loop import _StopSignals, initial_state, resolve_init_from
from lmsys.train.metrics import MetricsWriter
from lmsys.rl.data import ARITHMETIC, ArithmeticSFT, PromptSource, arithmetic_tokenizer, load_reward, score
from lmsys.train.run_dir import RunDirLock, save_tokenizer


def rl(cfg: Config, *, devices=None, progress: bool = True, stop_at: int | None = None) -> list[dict]:
    """Runs GRPO until `cfg.steps` rollouts (resuming from cfg.run_dir's checkpoints); `stop_at`:
    stop (with a checkpoint) after this step. Returns the metrics records of this call."""
    if cfg.data.format != "prompts":
        raise ConfigError(f"config key 'data.format' = {cfg.data.format!r}: lmsys rl samples prompts; set "
                          f"data.format=prompts (recipes/configs/grpo.yaml)")
    if jax.process_count() > 1:
        raise ConfigError("lmsys rl runs in one process (the engine samples on this process's devices); "
                          "start it without distributed.* / a multi-process launcher")
    with RunDirLock(path_or_url(cfg.run_dir)):
        return _rl(cfg, devices, progress, stop_at)


def prepare(cfg: Config, devices=None) -> Config:
    """The run's config with the arithmetic task's tokenizer written into run_dir and, with
    rl.sft_steps and no init_from, the supervised warm start trained (once) into run_dir/sft and
    made init_from; then init_from resolved (model.* and the tokenizer from there)."""
    run_dir = Path(cfg.run_dir)
    if cfg.data.source == ARITHMETIC and cfg.data.tokenizer == "builtin" and not cfg.init_from:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "tokenizer.json"
        if not path.is_file():
            arithmetic_tokenizer().save(str(path))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(path.absolute())))
    if cfg.rl.sft_steps and not cfg.init_from:
        if cfg.data.source != ARITHMETIC:
            raise ConfigError(f"config key 'rl.sft_steps' = {cfg.rl.sft_steps}: the built-in warm start is "
                              f"the arithmetic task's (data.source=arithmetic); else give init_from=RUN_DIR")
        from lmsys.train.loop import train

        sft = dataclasses.replace(cfg, run_dir=str((run_dir / "sft").absolute()), steps=cfg.rl.sft_steps,
                                  data=dataclasses.replace(cfg.data, format="text"),
                                  optimizer=dataclasses.replace(cfg.optimizer, lr=cfg.rl.sft_lr),
                                  rl=dataclasses.replace(cfg.rl, sft_steps=0))
        if _latest_step(Path(sft.run_dir)) != sft.steps:
            train(sft, devices=devices, progress=False, dataset=ArithmeticSFT(cfg.seed, cfg.seq_len))
        # the model is the warm start's now (resolve_init_from reads its model.* back)
        model = ModelConfig(attention_impl=cfg.model.attention_impl, init_std=cfg.model.init_std)
        cfg = dataclasses.replace(cfg, init_from=sft.run_dir, model=model)
    return resolve_init_from(cfg)


def _latest_step(run_dir: Path) -> int | None:
    if not (run_dir / "checkpoints").is_dir():
        return None
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def engine_rules(cfg: Config) -> Rules:
    """The engine's mesh: rl.engine_tensor devices (the first ones) over `tensor`."""
    t = cfg.rl.engine_tensor
    if t > jax.device_count():
        raise ConfigError(f"config key 'rl.engine_tensor' = {t}: this machine has {jax.device_count()} devices")
    return Rules(build_mesh(MeshConfig(data=1, fsdp=1, tensor=t), jax.devices()[:t]))


def make_engine(cfg: Config, tokenizer, rules: Rules):
    """An Engine for the rollouts: every sample of a step decoded together, one shape per call
    (batch-invariant: a sample's numbers never depend on the others), pages for all of them."""
    from lmsys.data.tokenizer import eos_id
    from lmsys.serve.engine import Engine, EngineConfig

    page = 16
    slots = cfg.rl.prompts_per_step * cfg.rl.group_size
    max_len = -(-cfg.seq_len // page) * page
    ecfg = EngineConfig(max_slots=slots, page_size=page, num_pages=slots * (max_len // page) + slots,
                        max_seq_len=max_len, prefill_chunk=max_len, batch_invariant=True,
                        prefill_tokens=slots * max_len)
    shapes = jax.eval_shape(lambda: llama.init(jax.random.key(0), cfg.model))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return Engine(zeros, cfg.model, tokenizer, ecfg, rules=rules, eos_token_id=eos_id(tokenizer))


class Handover:
    """The trainer's policy -> the engine: the model's params (with LoRA merged), resharded on
    device onto the engine's placement as new buffers (the trainer donates its state to each
    step, so the engine never shares its arrays), then `Engine.set_params`."""

    def __init__(self, trainer: GrpoTrainer, engine):
        self.engine = engine
        targets = engine.rules.tree_shardings(llama.param_axes(engine.model), llama.param_shapes(engine.model))
        self.merge = None
        if trainer.cfg.lora.rank:
            self.merge = jax.jit(lambda p: lora.merge(p), out_shardings=targets)
        self.targets = targets

    def __call__(self, params) -> float:
        begin = time.perf_counter()
        if self.merge is not None:
            served = self.merge(params)
        else:
            served = jax.device_put({k: v for k, v in params.items() if k in self.targets}, self.targets,
                                    may_alias=False)
        self.engine.set_params(served)
        jax.block_until_ready(self.engine.params)
        return time.perf_counter() - begin


def rollout(engine, rows: list[dict], cfg: Config, step: int):
    """G samples of each row's prompt: the finished requests, in order (row-major)."""
    from lmsys.serve.scheduler import GenerationOptions, RequestError

    r, reqs = cfg.rl, []
    for i, row in enumerate(rows):
        ids = engine.encode(row["prompt"])
        if not ids or len(ids) + r.max_new_tokens > cfg.seq_len:
            raise ConfigError(f"prompt {row['prompt'][:60]!r} is {len(ids)} tokens: prompt + rl.max_new_tokens "
                              f"({r.max_new_tokens}) must fit in seq_len ({cfg.seq_len}) and the prompt be non-empty")
        for g in range(r.group_size):
            seed = int(np.random.SeedSequence([cfg.seed, step, i * r.group_size + g]).generate_state(1)[0])
            opts = GenerationOptions(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     seed=seed, logprobs=0)
            try:
                reqs.append(engine.add_request(ids, opts))
            except RequestError as e:
                raise ConfigError(f"rollout: {e}") from None
    while engine.has_work():
        engine.step()
    return reqs


def train_batch(reqs, advantages: np.ndarray, seq_len: int):
    """The rows (prompt + completion) of a rollout, the completion's tokens in the loss, and per
    token the sampler's log-prob (NaN where it has none: the end-of-text token it stopped at)."""
    B = len(reqs)
    b = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    b["loss_mask"] = np.zeros((B, seq_len), np.float32)
    sampler = np.full((B, seq_len), np.nan, np.float32)
    for j, req in enumerate(reqs):
        ids = list(req.prompt_ids) + list(req.generated)
        n, p = len(ids) - 1, len(req.prompt_ids)
        b["tokens"][j, :n], b["targets"][j, :n] = ids[:-1], ids[1:]
        b["positions"][j, :n], b["segment_ids"][j, :n] = np.arange(n), 1
        b["loss_mask"][j, p - 1:n] = 1
        sampler[j, p - 1:p - 1 + len(req.token_logprobs)] = req.token_logprobs
    b["advantages"] = np.repeat(advantages[:, None], seq_len, 1).astype(np.float32)
    return b, sampler


def _rl(cfg: Config, devices, progress: bool, stop_at: int | None) -> list[dict]:
    cfg = prepare(cfg, devices)
    r = cfg.rl
    run_dir = Path(cfg.run_dir)
    source = PromptSource(cfg)
    reward_fn = load_reward(cfg)
    tcfg = dataclasses.replace(cfg, batch_size=r.prompts_per_step * r.group_size,
                               steps=cfg.steps * r.updates_per_rollout)
    trainer = GrpoTrainer(tcfg, Rules(build_mesh(cfg.mesh, devices)))
    from lmsys.data import tokenizer_for
    from lmsys.data.tokenizer import tokenizer_sha256

    tokenizer = tokenizer_for(cfg.data, cfg.model.vocab_size)
    source.check_lengths(tokenizer, cfg.seq_len - r.max_new_tokens)
    prov = {"tokenizer_sha256": tokenizer_sha256(tokenizer)}  # checked on resume, as training's
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    state, data_index, base_ref = initial_state(tcfg, trainer, ckpt, prov, run_dir, True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_tokenizer(run_dir, cfg.data.tokenizer, tokenizer)

    engine = make_engine(cfg, tokenizer, engine_rules(cfg))
    handover = Handover(trainer, engine)
    handover(state["params"])
    step_fn = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    writer = MetricsWriter(run_dir)
    tracker = None
    if cfg.tracking.mlflow:
        from lmsys.interop.tracking import MlflowTracker

        tracker = MlflowTracker(cfg)
    step = int(state["step"]) // r.updates_per_rollout
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    history = []
    try:
        with _StopSignals() as signals:
            while step < last:
                t0 = time.perf_counter()
                rows = source.rows(data_index, r.prompts_per_step)
                reqs = rollout(engine, rows, cfg, step)
                t_rollout = time.perf_counter() - t0
                completions = [q.text for q in reqs]
                rewards = score(reward_fn, r.reward, rows, completions, r.group_size)
                host, sampler = train_batch(reqs, group_advantages(rewards, r.group_size), cfg.seq_len)
                t1 = time.perf_counter()
                batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
                old, ref = trainer.score(state["params"], batch)
                batch["old_logps"], batch["ref_logps"] = old, ref
                for _ in range(r.updates_per_rollout):
                    state, metrics = step_fn(state, batch)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                t_update = time.perf_counter() - t1
                handover_s = handover(state["params"])
                data_index += r.prompts_per_step
                step += 1
                fault_point("after_step", step)
                has = ~np.isnan(sampler)
                diff = np.abs(sampler[has] - np.asarray(old)[has])
                generated = sum(len(q.generated) for q in reqs)
                record = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"],
                          "learning_rate": m["learning_rate"], "reward_mean": float(rewards.mean()),
                          "reward_std": float(rewards.std()), "clip_fraction": m["clip_fraction"],
                          **({"kl": m["kl"]} if "kl" in m else {}),
                          "completion_length": generated / len(reqs),
                          "logprob_diff": float(diff.mean()) if diff.size else 0.0,
                          "logprob_diff_max": float(diff.max()) if diff.size else 0.0,
                          "rollout_tokens_per_second": generated / t_rollout,
                          "train_tokens_per_second":
                              float(host["segment_ids"].sum()) * r.updates_per_rollout / t_update,
                          "rollout_s": t_rollout, "update_s": t_update, "handover_s": handover_s}
                history.append(record)
                for sink in (writer, tracker):
                    if sink:
                        sink.write(record)
                if progress:
                    print(f"rl step {step}: reward {record['reward_mean']:.3f}, kl {record.get('kl', 0):.4f}, "
                          f"clip {record['clip_fraction']:.3f}, handover {handover_s * 1e3:.1f} ms", flush=True)
                stopping = signals.received is not None
                if step == last or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    meta = make_meta(step, data_index, cfg.model, trainer.rules.mesh, prov)
                    ckpt.save(step, trainer.checkpointed(state), {**meta, **({"base": base_ref} if base_ref else {})})
                if stopping:
                    print(f"lmsys rl: {signals.received} received: stopped after step {step} with a checkpoint; "
                          f"re-run the same command to resume", flush=True)
                    break
    finally:
        for close in (ckpt.close, writer.close, tracker and tracker.close):
            if close:
                close()
    return history
