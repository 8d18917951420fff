"""Hybrid meshes: an inner (ICI) mesh inside each slice / node x an outer (DCN) mesh across them.
8 emulated CPU devices in 2 emulated slices of 4 (one process: consecutive runs of devices)."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from common import synthetic_batch, tiny_config
from lmsys.config import ConfigError, from_dict
from lmsys.parallel import Rules, build_mesh, mesh_shape
from lmsys.parallel.mesh import MESH_AXES, hybrid_devices, hybrid_shape
from lmsys.train import Trainer


def _ids(mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(mesh.devices)


def test_dcn_data_puts_one_slice_at_each_data_coordinate():
    mesh = build_mesh(from_dict({"mesh": {"dcn_data": 2, "data": 1, "fsdp": 4}}).mesh)
    assert dict(mesh.shape) == dict(stage=1, expert=1, data=2, fsdp=4, sequence=1, tensor=1)
    ids = _ids(mesh).reshape(2, 4)  # (data, fsdp)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_dcn_fsdp_keeps_the_inner_fsdp_factor_inside_a_slice():
    cfg = from_dict({"mesh": {"dcn_fsdp": 2, "data": 2, "fsdp": 2}}).mesh
    assert mesh_shape(cfg, 8) == dict(stage=1, expert=1, data=2, fsdp=4, sequence=1, tensor=1)
    ids = _ids(build_mesh(cfg)).reshape(2, 4)  # (data, fsdp): fsdp = dcn index x 2 + ici index
    # slice 0 (devices 0-3) holds fsdp coordinates 0-1, laid out (data=2, fsdp=2) inside it
    np.testing.assert_array_equal(ids, [[0, 1, 4, 5], [2, 3, 6, 7]])
    # the flat mesh data=2, fsdp=4 orders the same devices differently
    flat = _ids(build_mesh(from_dict({"mesh": {"data": 2, "fsdp": 4}}).mesh)).reshape(2, 4)
    assert not np.array_equal(ids, flat)


def _fakes(**attr_of_index):
    """8 stand-in CPU devices with per-device granule attributes (functions of the index)."""
    return [SimpleNamespace(id=i, platform="cpu", device_kind="cpu",
                            **{k: f(i) for k, f in attr_of_index.items()}) for i in range(8)]


def test_slices_and_processes_are_the_granules_when_there_are_several():
    ici, dcn = hybrid_shape(from_dict({"mesh": {"dcn_data": 2, "data": 1, "fsdp": 4}}).mesh, 8)
    # processes interleaved over the device list: process 0 owns the even devices
    by_process = hybrid_devices(ici, dcn, _fakes(process_index=lambda i: i % 2))
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(by_process).reshape(2, 4),
                                  [[0, 2, 4, 6], [1, 3, 5, 7]])
    # slice_index wins over process_index; slices are ordered by index (slice 0 = devices 4-7)
    by_slice = hybrid_devices(ici, dcn, _fakes(slice_index=lambda i: 1 - i // 4,
                                               process_index=lambda i: i % 2))
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(by_slice).reshape(2, 4),
                                  [[4, 5, 6, 7], [0, 1, 2, 3]])
    with pytest.raises(ConfigError) as e:
        hybrid_devices(ici, dcn, _fakes(process_index=lambda i: i % 4))
    assert str(e.value) == (
        "mesh.dcn_* (stage=1, expert=1, data=2, fsdp=1, sequence=1, tensor=1) needs 2 processes of "
        "4 devices each, but the 8 devices come in 4 processes of 2 devices; make the product of "
        "mesh.dcn_* the number of processes")


def _train(mesh: dict):
    cfg = tiny_config(mesh)
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
    state = trainer.init(cfg.seed)
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state["params"]


@pytest.fixture(scope="module")
def flat():
    return _train(dict(data=2, fsdp=4, tensor=1))


@pytest.mark.parametrize("mesh", [dict(dcn_data=2, data=1, fsdp=4, tensor=1),
                                  dict(dcn_fsdp=2, data=2, fsdp=2, tensor=1)],
                         ids=["dcn_data2", "dcn_fsdp2"])
def test_hybrid_mesh_trains_equal_to_the_flat_mesh(mesh, flat):
    losses, params = _train(mesh)
    flat_losses, flat_params = flat
    np.testing.assert_allclose(losses, flat_losses, rtol=1e-5)
    assert losses[2] < losses[0]
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(flat_params)):
        assert p.sharding.spec == q.sharding.spec, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def _error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


def test_misconfigured_hybrid_meshes_say_what_to_change():
    assert _error(lambda: build_mesh(from_dict({"mesh": {"dcn_data": 3, "data": 1}}).mesh)) == (
        "mesh.dcn_* (stage=1, expert=1, data=3, fsdp=1, sequence=1, tensor=1) span 3 slices / nodes, "
        "which do not divide the 8 devices; make the product of mesh.dcn_* the number of slices / nodes")
    assert _error(lambda: build_mesh(from_dict({"mesh": {"dcn_data": 2, "data": 2, "fsdp": 4}}).mesh)) == (
        "mesh (stage=1, expert=1, data=2, fsdp=4, sequence=1, tensor=1) needs 8 devices but 4 are "
        "available in each of the 2 slices / nodes (mesh.dcn_*); make the product of mesh.* equal 4 "
        "or set one axis to -1")
    assert "cannot fill mesh.fsdp: 4 devices in each of the 2 slices" in _error(
        lambda: build_mesh(from_dict({"mesh": {"dcn_fsdp": 2, "data": 3}}).mesh))
    assert _error(lambda: from_dict({"mesh": {"dcn_fsdp": 0}})) == (
        "config key 'mesh.dcn_fsdp' = 0: must be a positive number of slices / nodes (1 = none)")
    assert _error(lambda: from_dict({}, ["mesh.dcn_tensor=2"])).startswith(
        "config key 'mesh.dcn_tensor' does not exist: tensor parallelism all-reduces activations")
    # the model checks see the whole axis (ici x dcn): 2 layers do not split into 2 x 2 stages
    assert _error(lambda: tiny_config(dict(stage=2, dcn_stage=2, fsdp=2))).startswith(
        "config key 'model.n_layers' = 2: must be divisible by mesh.stage x pipeline.repeats = 4 x 1")


def test_default_keys_keep_the_flat_mesh():
    cfg = from_dict({"mesh": {"data": 2, "fsdp": -1, "tensor": 2}}).mesh
    assert hybrid_shape(cfg, 8) == (dict(stage=1, expert=1, data=2, fsdp=2, sequence=1, tensor=2),
                                    dict.fromkeys(MESH_AXES, 1))
    mesh = build_mesh(cfg)
    assert mesh.devices.shape == (1, 1, 2, 2, 1, 2)
    np.testing.assert_array_equal(_ids(mesh), _ids(jax.make_mesh((1, 1, 2, 2, 1, 2), MESH_AXES)))
