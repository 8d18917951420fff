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

from lmsys.checkpoint import Checkpointer, make_meta
from lmsys.config import Config, save_config
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.distributed import initialize as initialize_distributed
from lmsys.train.metrics import MetricsWriter, mfu, peak_flops
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


def load_data(cfg: Config):
    """The tokenizer and the packed dataset of a config (tokenized once, then cached)."""
    from lmsys.data import build_dataset, load_tokenizer

    d = cfg.data
    cache_dir = d.cache_dir or None
    tokenizer = load_tokenizer(d.tokenizer, cfg.model.vocab_size, source=d.source,
                               cache_dir=cache_dir, max_documents=d.max_documents,
                               text_field=d.text_field)
    return build_dataset(d.source, tokenizer, cfg.seq_len, cfg.seed, text_field=d.text_field,
                         max_documents=d.max_documents, cache_dir=cache_dir, shuffle=d.shuffle)


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
    Returns the metrics logged by this call (one dict per logged step)."""
    initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.run_dir)
    lead = jax.process_index() == 0
    mesh = build_mesh(cfg.mesh, devices)
    rules = Rules(mesh)
    trainer = Trainer(cfg, rules)
    dataset = dataset if dataset is not None else load_data(cfg)

    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(trainer.abstract_state, cfg.model)
        data_index = int(meta["data_index"])
        if lead:
            print(f"resuming {run_dir} from step {meta['step']}", flush=True)
    else:
        state, data_index = trainer.init(cfg.seed), 0
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    step = int(state["step"])
    step_fn = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    writer = MetricsWriter(run_dir) if lead else None
    bar = _progress_bar(cfg.steps, step) if (progress and lead) else None
    flops_per_token = llama.flops_per_token(cfg.model, cfg.seq_len)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.peak_flops)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    history = []
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _StopSignals() as signals:
            while step < last:
                local = dataset.batch(data_index, cfg.batch_size, jax.process_index(), jax.process_count())
                state, metrics = step_fn(state, global_batch(local, trainer.batch_sharding, cfg.batch_size))
                data_index += cfg.batch_size
                step += 1
                steps_since += 1
                stopping = signals.received is not None
                if step % cfg.log_every == 0 or step == last or stopping:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    tps = steps_since * tokens_per_step / (now - t_last)
                    t_last, steps_since = now, 0
                    record = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"],
                              "learning_rate": m["learning_rate"], "tokens_per_second": tps,
                              "mfu": mfu(tps, flops_per_token, mesh.size, peak),
                              "nonfinite_streak": int(m["nonfinite_streak"])}
                    history.append(record)
                    if writer:
                        writer.write(record)
                    if bar:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}")
                    if m["nonfinite_streak"] >= cfg.max_nonfinite_steps:
                        good = ckpt.latest_step()
                        where = (f"the last good checkpoint is {ckpt.directory / str(good)}" if good is not None
                                 else "there is no checkpoint yet")
                        raise TrainingError(
                            f"loss or gradients were not finite for {int(m['nonfinite_streak'])} steps in "
                            f"a row (to step {step}; those updates were skipped); {where}; lower "
                            f"optimizer.lr, raise optimizer.warmup_steps or check the data")
                if bar:
                    bar.update(1)
                periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                if periodic and int(metrics["nonfinite_streak"]) > 0:
                    periodic = False  # keep the last checkpoint a good one while steps are skipped
                if step == last or stopping or periodic:
                    ckpt.save(step, state, make_meta(step, data_index, cfg.model, mesh))
                if stopping:
                    if lead:
                        print(f"lmsys train: {signals.received} received: stopped after step {step} with a "
                              f"checkpoint; re-run the same command to resume", flush=True)
                    break
    finally:
        ckpt.close()
        if bar:
            bar.close()
        if writer:
            writer.close()
    return history


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
