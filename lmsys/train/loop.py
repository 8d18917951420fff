"""The training loop: the impure shell around the jitted step (data, logging, checkpoints).

    from lmsys.config import load_config
    from lmsys.train import train
    history = train(load_config("recipes/configs/tiny.yaml", ["steps=50"]))

Re-running with the same run_dir resumes from its latest complete checkpoint, with the data
position restored, so the run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmsys.checkpoint import Checkpointer, fault_point, is_url, make_meta, path_or_url
from lmsys.config import Config, save_config
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.distributed import initialize as initialize_distributed
from lmsys.train.metrics import MetricsWriter, mfu, peak_flops
from lmsys.train.profile import StepProfiler
from lmsys.train.run_dir import RunDirLock, provenance, resume, save_tokenizer, tokenizer_spec
from lmsys.train.adapters import has_frozen
from lmsys.train.dpo import METRICS as DPO_METRICS
from lmsys.train.step import BATCH_KEYS, Trainer


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to do."""


class _StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to stop after the current step, with
    a checkpoint. A second signal acts as usual (e.g. KeyboardInterrupt)."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old[signum])

    def __exit__(self, *_):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# Model keys that are choices of this run, not of the weights: kept from the config with init_from.
_RUN_MODEL_KEYS = ("preset", "attention_impl", "init_std")


def resolve_init_from(cfg: Config) -> Config:
    """With `init_from` set: the config whose model.* come from the source (an HF config.json, an
    lmsys run's config.yaml or a registered model, read by `lmsys.checkpoint.open_model`) and
    whose data.tokenizer is the source's (unless set); init_from pinned (an absolute directory, or
    models:/NAME/VERSION). A model.* key set in the config to another value than the source's is
    an error naming it. Without init_from: `cfg` unchanged. Idempotent."""
    if not cfg.init_from:
        return cfg
    import dataclasses

    from lmsys.checkpoint import open_model
    from lmsys.config import ConfigError, ModelConfig, from_dict, to_dict

    ref = cfg.init_from
    if not ref.startswith("models:/") and not Path(ref).expanduser().is_dir():
        raise ConfigError(f"config key 'init_from' = {ref!r}: no such directory; give a Hugging "
                          f"Face model directory (config.json + *.safetensors), an lmsys run directory "
                          f"(config.yaml + checkpoints/) or a registered model (models:/NAME@ALIAS)")
    src = open_model(ref)
    model = src.config.model
    if src.kind in ("hf", "peft"):
        tokenizer = src.config.data.tokenizer if Path(src.config.data.tokenizer).is_file() else None
    else:
        tokenizer = _source_tokenizer(src.config, src.path, path_or_url(cfg.run_dir))
    if cfg.model.preset:
        raise ConfigError(f"config key 'model.preset' = {cfg.model.preset!r}: the model comes from "
                          f"init_from ({src.ref}); remove model.preset")
    default, mine, theirs = (dataclasses.asdict(m) for m in (ModelConfig(), cfg.model, model))
    for key, value in mine.items():
        if key not in _RUN_MODEL_KEYS and value != default[key] and value != theirs[key]:
            raise ConfigError(f"config key 'model.{key}' = {value!r}: the model comes from init_from "
                              f"({src.ref}), which has model.{key} = {theirs[key]!r}; remove model.{key}")
    tree = to_dict(cfg)
    tree["model"] = {**theirs, **{k: mine[k] for k in _RUN_MODEL_KEYS}}
    tree["init_from"] = src.ref
    if cfg.data.tokenizer == "builtin":
        if tokenizer is None:
            raise ConfigError(f"config key 'data.tokenizer' = 'builtin': init_from {src.ref} has no "
                              f"tokenizer.json; set data.tokenizer=PATH to the model's tokenizer")
        tree["data"]["tokenizer"] = tokenizer
    return from_dict(tree)


def _source_tokenizer(source_cfg: Config, src: Path, run_dir: Path) -> str:
    """The tokenizer.json path of an lmsys run; a trained (builtin) one is written to
    run_dir/tokenizer.json so the fine-tune does not retrain it on its own data."""
    if source_cfg.data.tokenizer != "builtin":
        return source_cfg.data.tokenizer
    from lmsys.data import tokenizer_for
    from lmsys.data.cache import atomic_write_text

    if is_url(run_dir):
        from lmsys.config import ConfigError

        raise ConfigError(f"config key 'data.tokenizer' = 'builtin': init_from {src} trained its own "
                          f"tokenizer, which lmsys writes into run_dir, and run_dir {str(run_dir)!r} is a "
                          f"URL; set data.tokenizer=PATH to a local copy of it")
    tokenizer = tokenizer_for(source_cfg.data, source_cfg.model.vocab_size)
    out = run_dir.absolute() / "tokenizer.json"
    atomic_write_text(str(out), tokenizer.to_str())
    return str(out)


def _state_from_params(trainer: Trainer, params):
    """A fresh train state (step 0, new optimizer state; with LoRA new adapters) around loaded
    params, on the trainer's shardings."""
    return jax.jit(lambda p: trainer._init(trainer.cfg.seed, p), in_shardings=(trainer.base_shardings,),
                   out_shardings=trainer.state_shardings)(params)


def load_init_params(cfg: Config, trainer: Trainer):
    """The params of `cfg.init_from` (resolved), loaded straight onto the training shardings."""
    from lmsys.checkpoint import open_model

    params, _ = open_model(cfg.init_from).params(trainer.rules)
    return params


def load_data(cfg: Config):
    """The packed dataset of a config (tokenized once, then cached); with data.format=chat,
    conversations rendered with the tokenizer's chat template. `cfg` as resolved by
    `resolve_init_from` (train does that; a run's saved config.yaml already is)."""
    from lmsys.data import build_chat_dataset, build_dataset, tokenizer_for

    d = cfg.data
    cache_dir = d.cache_dir or None
    tokenizer = tokenizer_for(d, cfg.model.vocab_size)
    if d.format == "preference":
        from lmsys.data.chat_template import load_chat_template
        from lmsys.data.preference import build_preference_dataset

        return build_preference_dataset(d.source, tokenizer, load_chat_template(d.tokenizer), cfg.seq_len,
                                        cfg.seed, tokenizer_spec=d.tokenizer, max_pairs=d.max_documents,
                                        cache_dir=cache_dir, shuffle=d.shuffle)
    if d.format == "chat":
        from lmsys.data.chat_template import load_chat_template

        return build_chat_dataset(d.source, tokenizer, load_chat_template(d.tokenizer), cfg.seq_len,
                                  cfg.seed, tokenizer_spec=d.tokenizer, max_conversations=d.max_documents,
                                  cache_dir=cache_dir, shuffle=d.shuffle)
    return build_dataset(d.source, tokenizer, cfg.seq_len, cfg.seed, text_field=d.text_field,
                         max_documents=d.max_documents, cache_dir=cache_dir, shuffle=d.shuffle,
                         holdout=cfg.eval.holdout)


def make_evaluator(cfg: Config, trainer: Trainer, dataset):
    """The held-out evaluator of the run (compiled now), or None when eval.every is 0."""
    if not cfg.eval.every:
        return None
    from lmsys.eval.heldout import HeldoutEval

    return HeldoutEval(cfg, trainer, dataset.tokenizer)


def _evaluate(evaluator, cfg: Config, state, step: int) -> tuple[dict | None, float]:
    """At every eval.every steps and at the last step (whatever piece of the run this is, so a
    resumed run keeps the schedule): the held-out metrics, and the seconds they took."""
    if evaluator is None or (step % cfg.eval.every and step != cfg.steps):
        return None, 0.0
    begin = time.perf_counter()
    return evaluator.evaluate(state["params"], step), time.perf_counter() - begin


def _with_tokenizer(cfg: Config, spec: str) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))


def initial_state(cfg: Config, trainer: Trainer, ckpt: Checkpointer, data_provenance: dict, run_dir,
                  lead: bool):
    """(state, data_index, base reference or None) a run starts from: its newest checkpoint
    (resumed, with the frozen base / reference loaded again), else init_from's weights, else the
    seed's random init."""
    base = base_ref = None
    if has_frozen(cfg):  # the LoRA base / DPO reference: init_from's weights or the seed's init
        from lmsys.train.adapters import base_reference, load_base

        base, base_step = load_base(cfg, trainer.base_shardings, trainer.rules)
        base_ref = base_reference(cfg, base_step)
    if ckpt.latest_step() is not None:
        state, meta = resume(ckpt, trainer.abstract_checkpoint, cfg, data_provenance, run_dir, lead, base_ref)
        if base is not None:
            state = trainer.with_frozen(state, _state_from_params(trainer, base)["params"])
        data_index = int(meta["data_index"])
        if lead:
            print(f"resuming {run_dir} from step {meta['step']}", flush=True)
    elif cfg.init_from:
        params = base if base is not None else load_init_params(cfg, trainer)
        state, data_index = _state_from_params(trainer, params), 0
        if lead:
            print(f"initialized {run_dir} from {cfg.init_from}", flush=True)
    else:
        state, data_index = trainer.init(cfg.seed), 0
    return state, data_index, base_ref


def global_batch(local: dict[str, np.ndarray], sharding, global_batch_size: int) -> dict:
    """Assembles each process's rows into global arrays split over the mesh's batch axes."""
    out = {}
    for k in BATCH_KEYS:
        x = local[k]
        out[k] = jax.make_array_from_process_local_data(
            sharding, x, (global_batch_size,) + x.shape[1:])
    return out


def train(cfg: Config, *, devices: Sequence[jax.Device] | None = None, progress: bool = True,
          dataset=None, stop_at: int | None = None) -> list[dict]:
    """Trains until `cfg.steps`, resuming from `cfg.run_dir` if it holds a checkpoint.

    stop_at: stop (with a checkpoint) after this step instead, to train in pieces; the
      learning-rate schedule still spans `cfg.steps`, so pieces add up to one whole run.
    Returns the metrics logged by this call (one dict per logged step). The run holds its
    run_dir's lock meanwhile (lmsys.train.run_dir.RunDirLock): a second run on it fails at once."""
    if cfg.data.format == "prompts":
        from lmsys.config import ConfigError

        raise ConfigError("config key 'data.format' = 'prompts': prompts are sampled and rewarded by "
                          "`lmsys rl` (GRPO), not trained on; run lmsys rl CONFIG")
    joined_by = initialize_distributed(cfg.distributed)
    with RunDirLock(path_or_url(cfg.run_dir), active=jax.process_index() == 0):
        return _train(cfg, joined_by, devices, progress, dataset, stop_at)


def _train(cfg: Config, joined_by: str, devices, progress: bool, dataset, stop_at: int | None) -> list[dict]:
    cfg = resolve_init_from(cfg)
    run_dir = path_or_url(cfg.run_dir)
    lead = jax.process_index() == 0
    if lead and jax.process_count() > 1:
        print(f"{jax.process_count()} processes joined ({joined_by}): {jax.device_count()} devices, "
              f"{jax.local_device_count()} per process", flush=True)
    mesh = build_mesh(cfg.mesh, devices)
    rules = Rules(mesh)
    trainer = Trainer(cfg, rules)
    if dataset is None:  # with data.tokenizer=builtin, the run's own copy once it has one
        dataset = load_data(_with_tokenizer(cfg, tokenizer_spec(cfg.data.tokenizer, run_dir)))
    data_provenance = provenance(dataset)

    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    state, data_index, base_ref = initial_state(cfg, trainer, ckpt, data_provenance, run_dir, lead)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if getattr(dataset, "tokenizer", None) is not None:
            save_tokenizer(run_dir, cfg.data.tokenizer, dataset.tokenizer)

    step = int(state["step"])
    step_fn = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    evaluator = make_evaluator(cfg, trainer, dataset)
    writer = MetricsWriter(run_dir) if lead else None
    tracker = None
    if lead and cfg.tracking.mlflow:  # mlflow is imported only when enabled
        from lmsys.interop.tracking import MlflowTracker

        tracker = MlflowTracker(cfg)
    bar = _progress_bar(cfg.steps, step) if (progress and lead) else None
    flops_per_token = llama.flops_per_token(cfg.model, cfg.seq_len)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.peak_flops)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    history = []
    profiler = StepProfiler(cfg)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _StopSignals() as signals:
            while step < last:
                local = dataset.batch(data_index, cfg.batch_size, jax.process_index(), jax.process_count())
                profiler.before_step(step + 1, state)
                state, metrics = step_fn(state, global_batch(local, trainer.batch_sharding, cfg.batch_size))
                data_index += cfg.batch_size
                step += 1
                profiler.after_step(step, (state, metrics))
                fault_point("after_step", step)
                steps_since += 1
                stopping = signals.received is not None
                if jax.process_count() > 1:  # all processes stop after the same step, together
                    stopping = bool(np.any(multihost_utils.process_allgather(np.asarray(stopping))))
                record = None
                if step % cfg.log_every == 0 or step == last or stopping:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    tps = steps_since * tokens_per_step / (now - t_last)
                    t_last, steps_since = now, 0
                    record = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"],
                              "learning_rate": m["learning_rate"], "tokens_per_second": tps,
                              "mfu": mfu(tps, flops_per_token, mesh.size, peak),
                              "nonfinite_streak": int(m["nonfinite_streak"]),
                              **{k: m[k] for k in DPO_METRICS if k in m}}
                    if bar:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}")
                evaluated, eval_seconds = _evaluate(evaluator, cfg, state, step)
                t_last += eval_seconds  # the next tokens/s counts training time only
                if evaluated:
                    record = {**(record or {"step": step}), **evaluated}  # one line per step
                    if bar:
                        bar.write(f"step {step}: eval_loss {evaluated['eval_loss']:.4f}, "
                                  f"eval_bits_per_byte {evaluated['eval_bits_per_byte']:.4f}")
                if record:
                    history.append(record)
                    for sink in (writer, tracker):
                        if sink:
                            sink.write(record)
                if record and record.get("nonfinite_streak", 0) >= cfg.max_nonfinite_steps:
                    good = ckpt.latest_step()
                    where = (f"the last good checkpoint is {ckpt.directory / str(good)}" if good is not None
                             else "there is no checkpoint yet")
                    raise TrainingError(
                        f"loss or gradients were not finite for {record['nonfinite_streak']} steps in "
                        f"a row (to step {step}; those updates were skipped); {where}; lower "
                        f"optimizer.lr, raise optimizer.warmup_steps or check the data")
                if bar:
                    bar.update(1)
                periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                if periodic and int(metrics["nonfinite_streak"]) > 0:
                    periodic = False  # keep the last checkpoint a good one while steps are skipped
                if step == last or stopping or periodic:
                    meta = make_meta(step, data_index, cfg.model, mesh, data_provenance)
                    ckpt.save(step, trainer.checkpointed(state), {**meta, **({"base": base_ref} if base_ref else {})})
                if stopping:
                    if lead:
                        print(f"lmsys train: {signals.received or 'a stop signal on another process'} received: "
                              f"stopped after step {step} with a "
                              f"checkpoint; re-run the same command to resume", flush=True)
                    break
    except BaseException:
        # close what is open without letting a second error (e.g. the same full disk) hide this one
        for close in (profiler.close, ckpt.close, bar and bar.close, writer and writer.close, tracker and tracker.close):
            if close:
                try:
                    close()
                except Exception:
                    pass
        raise
    profiler.close()
    ckpt.close()
    for closer in (bar, writer, tracker):
        if closer:
            closer.close()
    return history


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
