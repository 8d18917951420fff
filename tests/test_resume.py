"""Checkpoints: stopping and resuming changes nothing (bitwise on the same mesh), resuming on
another mesh changes nothing beyond float noise, and a checkpoint of another model is refused."""

import jax
import numpy as np
import pytest

from common import tiny_config, write_corpus
from lmsys.checkpoint import CheckpointError, Checkpointer
from lmsys.config import MESH_AXES
from lmsys.train.loop import train

FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
MIXED = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_corpus(root / "corpus")


def _cfg(corpus, run_dir, steps, mesh, **model):
    root, source = corpus
    return tiny_config(mesh, steps=steps, run_dir=str(run_dir), checkpoint={"every": 3, "keep": 2},
                       data={"source": source, "cache_dir": str(root / "cache")},
                       model={"vocab_size": 512, **model})



@pytest.fixture(scope="module")
def straight(corpus):
    cfg = _cfg(corpus, corpus[0] / "straight", 6, FSDP8)
    return cfg, train(cfg, progress=False)


def _final_state(cfg):
    from lmsys.parallel import Rules, build_mesh
    from lmsys.train import Trainer

    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
    ckpt = Checkpointer(f"{cfg.run_dir}/checkpoints")
    state, meta = ckpt.restore(trainer.abstract_state, cfg.model)
    ckpt.close()
    return jax.device_get(state), meta


def test_stop_and_resume_is_bitwise_identical(corpus, straight):
    cfg6, history6 = straight
    run_dir = corpus[0] / "resumed"
    first = train(_cfg(corpus, run_dir, 6, FSDP8), progress=False, stop_at=3)
    second = train(_cfg(corpus, run_dir, 6, FSDP8), progress=False)
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in first + second] == [h["loss"] for h in history6]
    assert history6[-1]["loss"] < history6[0]["loss"]
    (a, meta_a), (b, meta_b) = _final_state(cfg6), _final_state(_cfg(corpus, run_dir, 6, FSDP8))
    assert meta_a["data_index"] == meta_b["data_index"] == 6 * cfg6.batch_size
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_resume_on_another_mesh(corpus, straight):
    _, history6 = straight
    run_dir = corpus[0] / "remeshed"
    train(_cfg(corpus, run_dir, 6, FSDP8), progress=False, stop_at=3)
    second = train(_cfg(corpus, run_dir, 6, MIXED), progress=False)
    np.testing.assert_allclose([h["loss"] for h in second], [h["loss"] for h in history6[3:]], rtol=1e-5)
    saved_mesh = Checkpointer(run_dir / "checkpoints").meta()["mesh"]
    assert saved_mesh == {**dict.fromkeys(MESH_AXES, 1), **MIXED}  # every axis, sizes as built


def test_checkpoint_of_another_model_is_refused(corpus, straight):
    cfg6, _ = straight
    with pytest.raises(CheckpointError, match=r"model.d_model is 64 there and 96 here; "
                                              r"set model.d_model=64 or use a new run_dir"):
        train(_cfg(corpus, cfg6.run_dir, 9, FSDP8, d_model=96), progress=False)
