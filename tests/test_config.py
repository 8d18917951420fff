"""Bad configs fail at once with one clear line naming the key, the value and a fix."""

import jax
import pytest

from lmsys.cli import main
from lmsys.config import ConfigError, from_dict, load_config
from lmsys.parallel import build_mesh


def _error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_mesh_that_does_not_divide_the_devices():
    msg = _error(lambda: build_mesh(from_dict({"mesh": {"data": 3, "fsdp": -1}}).mesh))
    assert "8 devices are not divisible" in msg and "mesh.fsdp" in msg
    msg = _error(lambda: build_mesh(from_dict({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}}).mesh))
    assert "needs 4 devices but 8 are available" in msg


def test_heads_not_divisible_by_tensor():
    msg = _error(lambda: from_dict({"model": {"n_heads": 6, "n_kv_heads": 6}, "mesh": {"tensor": 4}}))
    assert msg == ("config key 'model.n_heads' = 6: must be divisible by mesh.tensor (4); "
                   "change mesh.tensor or model.n_heads")
    # a filled tensor axis (-1) is checked once the mesh is built: the Trainer, like `lmsys plan`
    from lmsys.parallel import Rules
    from lmsys.train import Trainer

    cfg = from_dict({"model": {"preset": "tiny", "n_heads": 6, "n_kv_heads": 6},
                     "mesh": {"tensor": -1, "fsdp": 1}})
    msg = _error(lambda: Trainer(cfg, Rules(build_mesh(cfg.mesh))))
    assert msg.startswith("config key 'model.n_heads' = 6: must be divisible by mesh.tensor (8)")


def test_unknown_key_suggests_the_nearest():
    assert _error(lambda: from_dict({}, ["optimizer.learning_rate=1e-3"])).startswith(
        "unknown config key 'optimizer.learning_rate'")
    assert "did you mean 'model.d_model'" in _error(lambda: from_dict({"model": {"dmodel": 64}}))


def test_negative_learning_rate():
    assert _error(lambda: from_dict({}, ["optimizer.lr=-1e-3"])) == (
        "config key 'optimizer.lr' = -0.001: must be a positive number")


def test_wrong_types_and_values():
    assert "must be int, got 'many'" in _error(lambda: from_dict({}, ["steps=many"]))
    assert "must be one of none, full, selective" in _error(lambda: from_dict({}, ["remat=some"]))
    assert "unknown; choose one of tiny" in _error(lambda: from_dict({}, ["model.preset=huge"]))
    assert "only one mesh axis may be -1" in _error(lambda: from_dict({}, ["mesh.data=-1"]))


def test_overrides_and_presets_resolve(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  n_layers: 3\nsteps: 10\n")
    cfg = load_config(path, ["mesh.fsdp=4", "mesh.tensor=2", "optimizer.lr=1e-3", "dtype=bfloat16"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.steps) == (3, 256, 10)  # preset + override
    assert (cfg.mesh.fsdp, cfg.mesh.tensor, cfg.optimizer.lr, cfg.dtype) == (4, 2, 1e-3, "bfloat16")
    assert build_mesh(cfg.mesh).shape == {"stage": 1, "expert": 1, "data": 1, "fsdp": 4, "sequence": 1,
                                         "tensor": 2}


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["train", "recipes/configs/tiny.yaml", "optimizer.lr=-1", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmsys train: error: config key 'optimizer.lr' = -1.0: must be a positive number"
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert jax.device_count() == 8
