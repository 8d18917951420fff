"""Context parallelism over the `sequence` axis (lmsys.parallel.context): ring and all-gather
attention, the causal load-balanced layout, its work balance, memory, and misconfigurations.
8 emulated CPU devices; float32."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import synthetic_batch, tiny_config

from lmsys.config import ConfigError, MeshConfig
from lmsys.kernels.attention import xla_attention
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.context import (
    attention_work_per_device,
    context_parallel_attention,
    to_load_balanced,
)
from lmsys.plan.analysis import activation_bytes_per_device, attention_pairs_per_row
from lmsys.train import Trainer


def _loss_and_grads(mesh: dict, method: str = "ring"):
    cfg = tiny_config({**mesh, "sequence_method": method})
    devices = jax.devices()[:math.prod(mesh.get(a, 1) for a in ("data", "fsdp", "sequence", "tensor"))]
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, devices)))
    params = trainer.init(cfg.seed)["params"]
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    grads_fn = jax.jit(trainer.grads)
    loss, grads, _ = grads_fn(params, batch)
    return trainer, float(loss), jax.device_get(grads), grads_fn.lower(params, batch).as_text()


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads({})


SEQ = {"data": 1, "fsdp": 1, "tensor": 1}
CASES = {
    "seq2-ring": (dict(SEQ, sequence=2), "ring"),
    "seq4-ring": (dict(SEQ, sequence=4), "ring"),
    "seq8-ring": (dict(SEQ, sequence=8), "ring"),
    "seq2-allgather": (dict(SEQ, sequence=2), "allgather"),
    "seq4-allgather": (dict(SEQ, sequence=4), "allgather"),
    "seq8-allgather": (dict(SEQ, sequence=8), "allgather"),
    "seq2-fsdp2-tensor2-ring": ({"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}, "ring"),
    "data2-seq4-allgather": ({"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}, "allgather"),
    "seq4-ring-contiguous": (dict(SEQ, sequence=4, sequence_load_balance=False), "ring"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_matches_one_device(name, reference):
    """Causal attention over packed documents with the sequence split (load-balanced unless the
    case says contiguous): the loss and gradients of one device within 1e-5."""
    mesh, method = CASES[name]
    trainer, loss, grads, hlo = _loss_and_grads(mesh, method)
    assert trainer.rules.sequence_load_balance == mesh.get("sequence_load_balance", True)
    _, ref_loss, ref_grads, _ = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        assert np.linalg.norm(g - ref) <= 1e-5 * np.linalg.norm(ref), jax.tree_util.keystr(path)
    assert ("collective_permute" in hlo) == (method == "ring")  # K/V really travel the ring
    assert ("all_gather" in hlo) == (method == "allgather")


def test_load_balanced_layout():
    """Device i of a ring of n holds chunks i and 2n-1-i of the 2n chunks."""
    order = np.asarray(to_load_balanced(jnp.arange(16)[None], 4))[0]
    np.testing.assert_array_equal(order, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)  # trailing axes move with their token
    np.testing.assert_array_equal(to_load_balanced(x, 2)[:, :, 0], to_load_balanced(x[:, :, 0], 2))
    with pytest.raises(ValueError, match="2 x mesh.sequence = 8 .*sequence_load_balance=false"):
        to_load_balanced(jnp.arange(12)[None], 4)


def _attention_inputs(S=32, B=2, N=4, K=2, H=8):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, S, h, H)), jnp.float32) for h in (N, K, K))
    seg = jnp.asarray(np.where(np.arange(S) < S // 2 + 3, 1, 2)[None].repeat(B, 0), jnp.int32)
    return q, k, v, seg


@pytest.mark.parametrize("n", [4, 8])
def test_ring_skips_future_blocks_and_balances_causal_work(n):
    """Query-key pairs each device computes, counted from the blocks the ring really runs:
    contiguous, device i computes i+1 blocks of T x T (the last n times the first); balanced,
    every device computes the same 1.5 + (n-1)/2 blocks. Outputs equal plain attention either way."""
    q, k, v, seg = _attention_inputs()
    T = q.shape[1] // n
    want = xla_attention(q, k, v, q_segment_ids_BT=seg, causal=True)
    for balance in (False, True):
        rules = Rules(build_mesh(MeshConfig(fsdp=8 // n, sequence=n)), sequence_load_balance=balance)
        def order(x, n=n, balance=balance):
            return to_load_balanced(x, n) if balance else x

        args = [order(a) for a in (q, k, v, seg)]
        work = np.asarray(jax.jit(partial(attention_work_per_device, rules=rules))(*args))
        out = jax.jit(partial(context_parallel_attention, rules=rules))(*args)
        np.testing.assert_allclose(out, order(want), atol=2e-6)
        if balance:
            np.testing.assert_array_equal(work, np.full(n, (2 * n + 1) / 4 * T * T))
        else:
            np.testing.assert_array_equal(work, (np.arange(n) + 1) * T * T)
        assert work.max() == attention_pairs_per_row(n * T, n, "ring", balance)  # the formula


@pytest.mark.parametrize("method, balance", [("ring", True), ("ring", False), ("allgather", True)])
def test_sliding_window_and_soft_cap(method, balance):
    """A window of 5 tokens (shorter than a device's chunk and crossing chunk borders) and a
    logits soft cap: the ring and all-gather outputs equal plain attention with them."""
    q, k, v, seg = _attention_inputs()
    options = dict(sliding_window=5, logits_soft_cap=3.0)
    want = xla_attention(q, k, v, q_segment_ids_BT=seg, causal=True, **options)
    rules = Rules(build_mesh(MeshConfig(fsdp=2, sequence=4)), sequence_method=method,
                  sequence_load_balance=balance)
    order = partial(to_load_balanced, n=4) if balance else (lambda x: x)
    out = jax.jit(partial(context_parallel_attention, rules=rules, **options))(
        *(order(a) for a in (q, k, v, seg)))
    np.testing.assert_allclose(out, order(want), atol=2e-6)


def test_misconfigured_sequence_fails_with_a_clear_message():
    # balanced: 36 tokens do not cut into 2 x 4 chunks; contiguous only needs 4
    with pytest.raises(ConfigError, match=r"'seq_len' = 36: .*2 x mesh.sequence = 8.*sequence_load_balance=false"):
        tiny_config({"fsdp": 2, "sequence": 4}, seq_len=36)
    tiny_config({"fsdp": 2, "sequence": 4, "sequence_load_balance": False}, seq_len=36)
    with pytest.raises(ConfigError, match=r"'seq_len' = 30: must be divisible by mesh.sequence \(4\)"):
        tiny_config({"fsdp": 2, "sequence": 4, "sequence_load_balance": False}, seq_len=30)
    # sequence = -1 fills the mesh: checked once the Trainer knows the ring (8 devices)
    cfg = tiny_config({"fsdp": 1, "sequence": -1}, seq_len=24)
    with pytest.raises(ConfigError, match=r"'seq_len' = 24: .*2 x mesh.sequence = 16"):
        Trainer(cfg, Rules(build_mesh(cfg.mesh)))


def test_sequence_parallel_cuts_activation_memory_as_the_formula_says():
    """fsdp=2 on 2 devices vs the same plus a balanced ring of sequence=4 on 8, 1024 tokens:
    the compiled step's temporaries per device match activation_bytes_per_device within 15%,
    and so does the cut (the parameter-sized temporaries are the same on both meshes)."""
    temps, model = {}, None
    for seq in (1, 4):
        cfg = tiny_config({"data": 1, "fsdp": 2, "sequence": seq, "tensor": 1}, seq_len=1024, batch_size=2)
        trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:2 * seq])))
        compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
        temps[seq] = compiled.memory_analysis().temp_size_in_bytes
        model = cfg.model
    est = {seq: activation_bytes_per_device(model, batch=2, seq_len=1024, sequence=seq, batch_shards=2)
           for seq in (1, 4)}
    for seq in (1, 4):
        assert abs(temps[seq] - est[seq]) <= 0.15 * est[seq], (seq, temps, est)
    cut, est_cut = temps[1] - temps[4], est[1] - est[4]
    assert abs(cut - est_cut) <= 0.15 * est_cut, (temps, est)
    assert temps[4] < 0.15 * temps[1], temps  # a quarter of the tokens, ~1/7 of the attention pairs
