"""The model registry (MLflow-backed): register / alias / list / show / delete, `models:/` loading
with the content hash checked, the CLI, and `tracking.mlflow` logging from the training loop."""

import json
import logging

import jax
import numpy as np
import pytest

pytest.importorskip("mlflow")

from common import tiny_config, write_corpus

from lmsys.checkpoint import Checkpointer, load_model
from lmsys.cli import main
from lmsys.interop.registry import (
    ChangedCheckpointError,
    Registry,
    RegistryError,
    checkpoint_hash,
    parse_ref,
)
from lmsys.train.loop import train

FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
logging.getLogger("alembic").setLevel(logging.WARNING)


def _cfg(root, name, steps=2, **top):
    source = write_corpus(root / "corpus")
    return tiny_config(FSDP8, steps=steps, run_dir=str(root / name),
                       data={"source": source, "cache_dir": str(root / "cache")},
                       model={"vocab_size": 512}, **top)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 2-step run dir, a registry database and LMSYS_REGISTRY_URI pointing at it."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'registry.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSYS_REGISTRY_URI", uri)
    cfg = _cfg(root, "run")
    train(cfg, progress=False)
    yield root, uri, cfg
    mp.undo()


@pytest.fixture(scope="module")
def registered(env):
    _, uri, cfg = env
    reg = Registry(uri)
    v1 = reg.register(cfg.run_dir, "tiny-code", description="first")
    v2 = reg.register(f"{cfg.run_dir}/checkpoints/2", "tiny-code")
    reg.alias("tiny-code", "prod", 1)
    return reg, v1, v2


def test_register_records_checkpoint_hash_config_mesh_and_lineage(env, registered):
    root, _, cfg = env
    _, v1, v2 = registered
    step_dir = root / "run" / "checkpoints" / "2"
    assert (v1.name, v1.version, v2.version) == ("tiny-code", 1, 2)
    assert v1.path == step_dir.absolute() and v1.step == 2 and v1.run_dir == (root / "run").absolute()
    assert v1.sha256 == v2.sha256 == checkpoint_hash(step_dir) and len(v1.sha256) == 64
    t = v1.tags
    assert all(isinstance(v, str) for v in t.values())
    assert json.loads(t["lmsys.model_config"])["d_model"] == 64
    mesh = json.loads(t["lmsys.mesh"])  # as saved in the checkpoint meta
    assert {k: v for k, v in mesh.items() if v != 1} == {"fsdp": 8} and mesh["data"] == 1
    assert t["lmsys.data_source"] == cfg.data.source and t["lmsys.data_tokenizer"] == "builtin"
    final = json.loads(t["lmsys.final_metrics"])
    last = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final == last and final["step"] == 2
    assert t["lmsys.parent"] == "" and v1.description == "first"


def test_alias_list_show_and_resolve(registered):
    reg, v1, _ = registered
    assert reg.list() == [{"name": "tiny-code", "latest": 2, "versions": 2, "aliases": {"prod": 1}}]
    r = reg.resolve("models:/tiny-code@prod")
    assert (r.version, r.path, r.sha256, r.aliases) == (1, v1.path, v1.sha256, ["prod"])
    assert reg.resolve("models:/tiny-code/2").version == 2
    assert reg.resolve("tiny-code").version == 2  # a bare name is the latest version
    text = reg.show("tiny-code@prod")
    assert text.splitlines()[0] == "tiny-code v1  (aliases: prod)"
    for want in (str(v1.path), v1.sha256, "data=1 fsdp=8", "loss="):
        assert want in text
    assert parse_ref("models:/a/b@c").name == "a/b"


def test_load_model_from_the_registry_gives_the_checkpoints_params(env, registered):
    _, _, cfg = env
    model = load_model("models:/tiny-code@prod")
    assert (model.name, model.step) == ("tiny-code", 2)
    ckpt = Checkpointer(f"{cfg.run_dir}/checkpoints")
    params, _ = ckpt.restore_params(cfg.model)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_registered_model_is_a_source_for_fine_tuning_and_export(env, registered, tmp_path):
    from lmsys.checkpoint import open_model
    from lmsys.config import from_dict
    from lmsys.interop import load_hf
    from lmsys.train.loop import resolve_init_from

    root, _, cfg = env
    ckpt = Checkpointer(f"{cfg.run_dir}/checkpoints")
    params, _ = ckpt.restore_params(cfg.model)
    ckpt.close()
    ft = resolve_init_from(from_dict({"init_from": "models:/tiny-code@prod", "run_dir": str(tmp_path / "ft"),
                                      "data": {"source": cfg.data.source}}))
    assert ft.init_from == "models:/tiny-code/1"  # the alias pinned to the version it named
    assert (ft.model.d_model, ft.model.vocab_size, ft.model.qkv_bias) == (64, 512, True)
    assert ft.data.tokenizer == str(root / "run" / "tokenizer.json")  # the run's own copy of its BPE
    assert resolve_init_from(ft).init_from == ft.init_from
    loaded, step = open_model(ft.init_from).params()
    assert step == 2
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert main(["convert", "to-hf", "models:/tiny-code@prod", str(tmp_path / "hf")]) == 0
    exported, model = load_hf(tmp_path / "hf")
    assert model.d_model == 64 and (tmp_path / "hf" / "tokenizer.json").is_file()
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_references_fail_clearly(registered):
    reg, _, _ = registered
    with pytest.raises(RegistryError, match=r"model 'tiny-code' has no alias 'staging'"):
        reg.resolve("models:/tiny-code@staging")
    with pytest.raises(RegistryError, match=r"model 'tiny-code' has no version 9"):
        load_model("models:/tiny-code/9")
    with pytest.raises(RegistryError, match=r"unknown model 'nope'"):
        reg.resolve("models:/nope@prod")
    with pytest.raises(RegistryError, match=r"not a model reference"):
        reg.resolve("models:/tiny-code/v1")
    with pytest.raises(RegistryError, match=r"is not an lmsys run directory"):
        reg.register("/nonexistent/run", "x")


def test_changed_checkpoint_is_refused(env):
    root, uri, _ = env
    cfg = _cfg(root, "tamper")
    train(cfg, progress=False)
    reg = Registry(uri)
    r = reg.register(cfg.run_dir, "tamper")
    victim = max(p for p in r.path.rglob("*") if p.is_file() and p.stat().st_size > 0)
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    msg = (rf"checkpoint of tamper v1 changed since it was registered \(sha256 \w+\.\.\. != "
           rf"{r.sha256[:16]}\.\.\.\) at {r.path}; re-register it")
    with pytest.raises(ChangedCheckpointError, match=msg):
        load_model("models:/tamper/1")
    assert main(["generate", "models:/tamper/1", "--prompt", "def"]) == 2


def test_changed_config_tokenizer_or_chat_template_is_refused_naming_the_file(env, registered):
    """A version's record covers everything loading reads: config.yaml, the run's tokenizer.json
    and its chat template; each is hashed as it is read, and a changed or added one is refused."""
    root, _, _ = env
    _, v1, _ = registered
    assert set(json.loads(v1.tags["lmsys.files"])) == {"config.yaml", "tokenizer.json"}
    run = root / "run"
    for name, change in [("config.yaml", lambda b: b + b"# edited\n"),
                         ("tokenizer.json", lambda b: b.replace(b'"<|pad|>"', b'"<|PAD|>"', 1))]:
        original = (run / name).read_bytes()
        (run / name).write_bytes(change(original))
        try:
            with pytest.raises(ChangedCheckpointError, match=rf"^{name} of tiny-code v1 changed since it was "
                                                             rf"registered \(sha256 \w+\.\.\. != \w+\.\.\.\) at "
                                                             rf"{run / name}; re-register it$"):
                load_model("models:/tiny-code@prod")
        finally:
            (run / name).write_bytes(original)
    (run / "chat_template.jinja").write_text("{{ messages }}")
    try:
        with pytest.raises(ChangedCheckpointError, match=r"chat_template.jinja of tiny-code v1 was not part of it"):
            load_model("models:/tiny-code@prod")
    finally:
        (run / "chat_template.jinja").unlink()
    assert load_model("models:/tiny-code@prod").step == 2  # restored: loads again


def test_delete_a_version_and_a_model(env, registered):
    _, uri, cfg = env
    reg = Registry(uri)
    reg.register(cfg.run_dir, "doomed")
    reg.register(cfg.run_dir, "doomed")
    reg.delete("doomed", 1)
    with pytest.raises(RegistryError, match="has no version 1"):
        reg.resolve("doomed/1")
    assert reg.resolve("doomed").version == 2
    reg.delete("doomed")
    with pytest.raises(RegistryError, match="unknown model 'doomed'"):
        reg.resolve("doomed")
    assert reg.resolve("tiny-code/1").path.is_dir()  # checkpoint files are untouched


def test_cli(env, capsys):
    root, _, cfg = env
    uri = f"sqlite:///{root / 'cli.db'}"
    assert main(["registry", "register", cfg.run_dir, "--name", "cli-model", "--uri", uri]) == 0
    assert "registered cli-model v1 (step 2" in capsys.readouterr().out
    assert main(["registry", "alias", "cli-model", "prod", "1", "--uri", uri]) == 0
    assert capsys.readouterr().out.strip() == "cli-model@prod -> v1"
    assert main(["registry", "list", "--uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "LATEST", "VERSIONS", "ALIASES"]
    assert out[1].split() == ["cli-model", "v1", "1", "prod", "->", "v1"]
    assert main(["registry", "show", "cli-model@prod", "--uri", uri]) == 0
    assert "cli-model v1  (aliases: prod)" in capsys.readouterr().out
    for argv, err in [(["show", "cli-model@staging"], "has no alias 'staging'"),
                      (["alias", "cli-model", "prod", "7"], "has no version 7"),
                      (["delete", "nope"], "unknown model 'nope'"),
                      (["register", str(root / "missing"), "--name", "x"], "not an lmsys run directory")]:
        assert main(["registry", *argv, "--uri", uri]) == 2
        e = capsys.readouterr().err
        assert e.startswith("lmsys registry: error: ") and err in e and e.count("\n") == 1
    assert main(["registry", "delete", "cli-model", "1", "--uri", uri]) == 0
    assert "deleted cli-model v1" in capsys.readouterr().out


def test_training_logs_params_and_metrics_to_mlflow(env):
    from mlflow import MlflowClient

    root, _, _ = env
    uri = f"sqlite:///{root / 'tracking.db'}"
    cfg = _cfg(root, "tracked", tracking={"mlflow": True, "uri": uri, "experiment": "tests"})
    train(cfg, progress=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "64" and run.data.params["steps"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert "mfu" not in run.data.metrics  # None on CPU: not logged
    cfg3 = _cfg(root, "tracked", steps=3, tracking={"mlflow": True, "uri": uri, "experiment": "tests"})
    train(cfg3, progress=False)  # resuming the run dir continues its MLflow run
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


def test_parent_model_is_recorded_from_init_from(env, registered):
    import shutil

    import yaml

    root, uri, cfg = env
    reg = Registry(uri)
    for i, (init_from, parent) in enumerate([(cfg.run_dir, "models:/tiny-code/2"),  # a registered path
                                             ("models:/tiny-code@prod", "models:/tiny-code/1"),
                                             (str(root / "elsewhere"), str(root / "elsewhere"))]):
        child = root / f"child{i}"
        shutil.copytree(cfg.run_dir, child)
        tree = yaml.safe_load((child / "config.yaml").read_text())
        (child / "config.yaml").write_text(yaml.safe_dump({**tree, "init_from": init_from}))
        assert reg.register(child, f"child{i}").tags["lmsys.parent"] == parent
