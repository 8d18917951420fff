"""FSDP (ZeRO-3) really splits parameters and optimizer state: per-device argument bytes of the
compiled train step, from XLA's own memory analysis."""

import math

import jax

from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.train import Trainer


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state():
    cfg = from_dict({"model": {"preset": "small"}, "mesh": {"fsdp": 8}, "batch_size": 8, "seq_len": 64})
    n_params = llama.count_params(cfg.model)
    assert n_params > 10_000_000  # big enough that small replicated leaves don't dominate
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    argument_bytes = compiled.memory_analysis().argument_size_in_bytes

    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    assert state_bytes >= 12 * n_params  # float32 params + two Adam moments
    batch = trainer.abstract_batch()
    batch_bytes_per_device = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) / 8
    state_bytes_per_device = argument_bytes - batch_bytes_per_device
    assert state_bytes_per_device <= 1.15 * state_bytes / 8, (state_bytes_per_device, state_bytes / 8)
