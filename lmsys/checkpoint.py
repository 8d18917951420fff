"""Orbax checkpoints shared by training, serving and interop.

A checkpoint directory holds numbered steps; each step has two items: `state` (the train-state
pytree, written by every process in parallel, async) and `meta` (JSON: the model config, the
mesh it was saved with, the data position). Orbax writes a step into a temporary directory and
renames it when complete, so a crash mid-save never leaves a step that looks finished.

The directory may be a local path or a URL Orbax reads and writes through etils.epath
(`gs://bucket/run/checkpoints`, `s3://...`); URLs are kept as they are (never made absolute).

Fault injection for tests: `LMSYS_FAULT_KILL_AT=POINT:STEP` makes the process SIGKILL itself at
that point of that step (see `fault_point`); unset, nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from lmsys.config import Config, ModelConfig

# Model keys that decide parameter shapes: a checkpoint must agree on all of them.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "tie_embeddings", "qkv_bias", "qk_norm")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says why and what to do."""


FAULT_ENV = "LMSYS_FAULT_KILL_AT"
# Where a fault can be injected: after a step's update (before its checkpoint starts); just after
# a checkpoint save started (async: its files are being written); and inside the write, when all
# of the step's files are on disk in Orbax's temporary directory but it is not yet committed.
FAULT_POINTS = ("after_step", "save_started", "before_commit")


def fault_point(name: str, step: int) -> None:
    """Kills this process with SIGKILL (no clean-up, as `kill -9` would) when $LMSYS_FAULT_KILL_AT
    is `name:step`. A test hook: the fault-injection tests use it to stop a run at exact,
    reproducible places; it does nothing when the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, at = spec.partition(":")
    if point not in FAULT_POINTS or not at.isdigit():
        raise ValueError(f"${FAULT_ENV} = {spec!r}: expected POINT:STEP with POINT one of "
                         f"{', '.join(FAULT_POINTS)} (e.g. before_commit:4); unset it to run normally")
    if point == name and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class _FaultInjectingTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's default commit for local directories (write into a temporary directory, then mark
    it complete and rename it), with the `before_commit` fault point in front of the commit.
    Used only while $LMSYS_FAULT_KILL_AT is set."""

    async def finalize(self, *args, **kwargs):
        final = self.get_final().name
        if final.isdigit():  # the step directory (not an item inside it)
            fault_point("before_commit", int(final))
        return await super().finalize(*args, **kwargs)


def path_or_url(path: str | os.PathLike):
    """A local `Path`, or for a URL (gs://, s3://) an `etils.epath.Path`, which keeps the URL
    intact (pathlib would turn gs://b into gs:/b); both have the pathlib API."""
    return epath.Path(path) if is_url(path) else Path(path)


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """A checkpoint directory as Orbax takes it: local paths made absolute, URLs unchanged."""
    return epath.Path(directory if is_url(directory) else Path(directory).absolute())


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (an object store), False for a local path."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(path)) is not None


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """read_only: a reader's (serve, generate, convert, registry, init_from, eval): it creates,
        prunes and deletes nothing, so a training run saving into the directory meanwhile (its
        step being written in a temporary directory) is left alone. The writer (the training
        loop) holds the run directory's lock (lmsys.train.run_dir)."""
        self.directory = checkpoint_path(directory)
        self.read_only = read_only
        if read_only:
            _quiet_read_only_notice()
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                enable_async_checkpointing=False)
        else:
            # cleanup_tmp_directories: a save cut short (kill -9, full disk) leaves a temporary
            # directory that never counts as a step; it is removed at the next start.
            fault_hook = os.environ.get(FAULT_ENV) and not is_url(directory)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                temporary_path_class=_FaultInjectingTemporaryPath if fault_hook else None)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))
        self._writing: int | None = None  # the step being saved
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async). A failed
        write (e.g. a full disk) raises CheckpointError here or at the next save / wait."""
        try:
            self.manager.wait_until_finished()  # a failure of the previous save is its own
            self._writing = step
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._write_error(e) from None
        fault_point("save_started", step)

    def _write_error(self, e: Exception) -> CheckpointError:
        self._failed = True
        os_error = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's errors carry errno
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        elif os_error:
            reason = os.strerror(int(os_error.group(1)))
        else:
            reason = str(e).splitlines()[0][:300]
        complete = [s for s in self.manager.all_steps(read=True) if s != self._writing]
        last = f"step {max(complete)}, which is intact" if complete else "none"
        return CheckpointError(
            f"writing checkpoint step {self._writing} to {self.directory} failed ({reason}); the "
            f"last complete checkpoint is {last}; free space or fix the directory, then re-run "
            f"to resume")

    def meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, model: ModelConfig, step: int | None = None):
        """Restores `state` onto the shardings in `abstract_state` (any mesh), after checking
        that the checkpoint holds the same model shape. Returns (state, meta)."""
        step = self._step(step)
        meta = self.meta(step)
        check_model(meta.get("model", {}), model, f"{self.directory} step {step}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} does not match this train state "
                f"({str(e).splitlines()[0][:200]}); train into a new run_dir") from None
        return restored["state"], meta

    def restore_intact(self, abstract_state, check) -> tuple[dict, dict, list[tuple[int, str]]]:
        """Restores the newest step that reads back, for a resume: a step whose meta or arrays
        cannot be read (a damaged or truncated file) is skipped for the next older one;
        `check(meta, step)` may refuse a step by raising CheckpointError (another model, another
        tokenizer), which stops the search. Returns (state, meta, [(skipped step, why)]); when
        no step restores, CheckpointError about the newest."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.meta(step)
            except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many kinds
                skipped.append((step, _first_line(e)))
                continue
            check(meta, step)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
            except Exception as e:  # noqa: BLE001
                skipped.append((step, _first_line(e)))
                continue
            return state, meta, skipped
        if not skipped:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        step, why = skipped[0]
        older = "; no older step restores either" if len(skipped) > 1 else ""
        raise CheckpointError(
            f"checkpoint {self.directory} step {step} does not match this train state or cannot be "
            f"read ({why}){older}; train into a new run_dir")

    def set_aside(self, step: int) -> str:
        """Renames an unreadable step directory to STEP.unreadable-TIME (kept for a look, no
        longer a step, so the run can write that step again). Returns the new name."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        import time

        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        src.rename(dst)
        self.manager.reload()
        return dst.name

    def restore_params(self, model: ModelConfig, shardings=None, step: int | None = None, shapes=None):
        """Only the parameters (no optimizer state), placed on `shardings` (a pytree like the
        params; default: the first device). Returns (params, meta). `shapes`: of the saved params
        (default: `model`'s; a LoRA run's adapters, lmsys.train.adapters)."""
        from lmsys.models import llama

        step = self._step(step)
        meta = self.meta(step)
        check_model(meta.get("model", {}), model, f"{self.directory} step {step}")
        shapes = llama.param_shapes(model) if shapes is None else shapes
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        target = {"params": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                         shapes, shardings)}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))
        return restored["state"]["params"], meta

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from None

    def close(self) -> None:
        """Waits for a pending save (raising CheckpointError if it failed), then closes."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint{'' if step is None else f' at step {step}'} "
                                  f"in {self.directory}")
        return step


def _quiet_read_only_notice() -> None:
    """Orbax logs a warning each time a manager opens read-only; readers open one per load."""
    import logging

    absl = logging.getLogger("absl")
    if not any(getattr(f, "lmsys", False) for f in absl.filters):
        def drop(record):
            return not str(record.msg).startswith("Given directory is read only")
        drop.lmsys = True
        absl.addFilter(drop)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__


def check_model(saved: dict, model: ModelConfig, where: str) -> None:
    """Refuses a checkpoint whose model shape differs from `model`, naming the first key."""
    here = dataclasses.asdict(model)
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != here[key]:
            raise CheckpointError(
                f"checkpoint {where} holds a different model: model.{key} is {saved[key]!r} there "
                f"and {here[key]!r} here; set model.{key}={saved[key]} or use a new run_dir")


def make_meta(step: int, data_index: int, model: ModelConfig, mesh: jax.sharding.Mesh,
              provenance: dict | None = None) -> dict:
    """A checkpoint's meta item; `provenance` (lmsys.train.run_dir.provenance: the tokenizer's
    sha256 and the data's fingerprint) is merged in."""
    return {"step": step, "data_index": data_index, "model": dataclasses.asdict(model),
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, **(provenance or {})}


def load_run(run_dir: str | Path, rules=None, step: int | None = None):
    """A run directory's config (`config.yaml`) and the parameters of its latest (or given)
    checkpoint, sharded by `rules` (default: one device). Returns (Config, params, meta).
    Read-only: a run training into the directory meanwhile is left alone."""
    from lmsys.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not an lmsys run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    params, meta = _restore_run_params(run_dir, cfg, rules, step)
    return cfg, params, meta


def _restore_run_params(run_dir: Path, cfg: Config, rules, step: int | None):
    """A run's params; a LoRA run's (lora.rank > 0) are its base with the adapters merged in."""
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ yet; train or convert into it first")
    if cfg.lora.rank:
        from lmsys.train.adapters import load_run as load_lora_run

        return load_lora_run(run_dir, cfg, rules, step)
    model = cfg.model
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.restore_params(model, _param_shardings(model, rules), step)
    finally:
        ckpt.close()


def _param_shardings(model: ModelConfig, rules):
    if rules is None:
        return None
    from lmsys.models import llama

    return rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))


# ----------------------------------------------------------------------------- model directories


@dataclasses.dataclass
class ModelDir:
    """A model reference, opened without reading its weights.

    kind "run": an lmsys run directory (config.yaml + checkpoints/, from `lmsys train` or `lmsys
    convert from-hf`); "hf": a Hugging Face model directory (config.json + safetensors); "peft": a
    PEFT LoRA adapter directory, its `base` with the adapter merged in (lmsys.interop.peft).
    `config` holds the model and data.tokenizer (a run's whole saved config), the tokenizer as a
    path that exists where one does: a run's own copy (RUN_DIR/tokenizer.json, written when the
    run started) first, so a run directory copied to another machine serves with its own
    tokenizer. `ref` pins the reference: the absolute directory, or `models:/NAME/VERSION` of a
    registered model (whose `step` is the registered one). `files` (a registered model's
    lmsys.interop.registry.FileCheck) hashes every file as it is read and refuses one that
    changed since registration; the weights are hashed after they are read."""

    kind: str
    path: Path
    name: str
    ref: str
    config: Config
    step: int | None = None
    hf_config: dict | None = None
    files: object = None
    base: ModelDir | None = None  # kind "peft" (a PEFT adapter directory): its base model

    def _read(self, path) -> bytes:
        return self.files.read(path) if self.files is not None else Path(path).read_bytes()

    def params(self, rules=None, step: int | None = None) -> tuple[dict, int]:
        """(params, step) of the latest (or given) checkpoint, placed straight onto the shardings
        of `rules` (None: one device); a Hugging Face directory is step 0."""
        if self.step is not None and step is not None and step != self.step:
            from lmsys.interop.registry import RegistryError

            raise RegistryError(f"{self.name} is registered at step {self.step}, not step {step}")
        step = self.step if step is None else step
        if self.kind == "peft":
            from lmsys.interop.peft import merged_params

            return merged_params(self, rules, step)
        if self.kind == "hf":
            from lmsys.interop.hf import load_hf

            params, _ = load_hf(self.path, _param_shardings(self.config.model, rules), model=self.config.model)
            return params, 0
        try:
            params, meta = _restore_run_params(self.path, self.config, rules, step)
        except Exception:
            if self.files is not None:
                self.files.verify_weights()  # a changed checkpoint says so, not a read error
            raise
        if self.files is not None:
            self.files.verify_weights()  # after the read: the bytes loaded hash as registered
        return params, int(meta["step"])

    def tokenizer(self):
        from lmsys.data.tokenizer import BUILTIN, tokenizer_file, tokenizer_for, tokenizer_from_json

        spec = self.config.data.tokenizer
        if spec == BUILTIN:  # a run from before runs kept their tokenizer: the data's cached BPE
            tokenizer = tokenizer_for(self.config.data, self.config.model.vocab_size)
            if self.files is not None:
                self.files.check("tokenizer (builtin, from the cache)", tokenizer.to_str().encode())
            return tokenizer
        path = tokenizer_file(spec)
        return tokenizer_from_json(self._read(path), path, self.config.model.vocab_size)

    def chat_template(self) -> str | None:
        """The chat template beside the tokenizer (lmsys.data.chat_template.load_chat_template);
        None: the default one."""
        from lmsys.data.chat_template import load_chat_template
        from lmsys.data.tokenizer import BUILTIN

        spec = self.config.data.tokenizer
        return None if spec == BUILTIN else load_chat_template(spec, read=self._read)

    def eos_token_id(self, tokenizer) -> int:
        """config.json's eos_token_id (the first of a list) for an HF model, else the
        tokenizer's end-of-text token."""
        from lmsys.data import eos_id

        eos = (self.hf_config or {}).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos_id(tokenizer) if eos is None else int(eos)


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: Config
    params: dict
    tokenizer: object
    eos_token_id: int | None
    step: int
    chat_template: str | None = None  # None: lmsys.data.chat_template.DEFAULT_CHAT_TEMPLATE
    ref: str = ""  # ModelDir.ref: the directory, or the version loaded (models:/NAME/VERSION)


def open_model(ref: str | Path, registry_uri: str | None = None, *, files=None) -> ModelDir:
    """The one reader of model references, used by serve, generate, fine-tuning (`init_from`)
    and export: an lmsys run directory (config.yaml), a Hugging Face model directory
    (config.json), or a registered model `models:/NAME@ALIAS` / `models:/NAME/VERSION` (registry
    `registry_uri`, else $LMSYS_REGISTRY_URI or the local one), whose files must still hash as
    registered. Reads configs only; `ModelDir.params` reads the weights. Writes nothing.
    `files`: a FileCheck hashing each file read (the registry records them so)."""
    if isinstance(ref, str) and ref.startswith("models:/"):
        from lmsys.interop.registry import resolve_checked

        resolved, files = resolve_checked(ref, registry_uri)
        found = open_model(resolved.run_dir, files=files)
        return dataclasses.replace(found, name=resolved.name, step=resolved.step,
                                   ref=f"models:/{resolved.name}/{resolved.version}")
    path = Path(ref).expanduser()
    if (path / "adapter_config.json").is_file():  # a PEFT LoRA adapter: its base, merged
        from lmsys.interop.peft import open_peft

        return open_peft(path, files)
    if (path / "config.yaml").is_file():
        from lmsys.config import config_from_yaml

        read = files.read if files is not None else Path.read_bytes
        cfg = config_from_yaml(read(path / "config.yaml").decode("utf-8"), str(path / "config.yaml"))
        cfg.data.tokenizer = _run_tokenizer(cfg.data.tokenizer, path)
        return ModelDir("run", path, path.name, str(path.absolute()), cfg, files=files)
    if (path / "config.json").is_file():
        from lmsys.config import from_dict
        from lmsys.interop.hf_config import hf_model_config

        model, hf_config = hf_model_config(path)
        cfg = from_dict({"model": dataclasses.asdict(model),
                         "data": {"tokenizer": str(path.absolute() / "tokenizer.json")}})
        return ModelDir("hf", path, path.absolute().name, str(path.absolute()), cfg, hf_config=hf_config)
    raise CheckpointError(f"{path} is not a training run directory (no config.yaml) nor a Hugging Face "
                          f"model directory (config.json + *.safetensors); pass the run_dir of an "
                          f"`lmsys train` run")


def load_model(ref: str | Path, rules=None, step: int | None = None,
               registry_uri: str | None = None) -> LoadedModel:
    """`open_model(ref)` with its weights (sharded by `rules`, else on one device), tokenizer,
    chat template and end-of-sequence id: what serving and generation need."""
    found = open_model(ref, registry_uri)
    tokenizer = found.tokenizer()
    template = found.chat_template()
    params, step = found.params(rules, step)
    return LoadedModel(found.name, found.config, params, tokenizer, found.eos_token_id(tokenizer), step,
                       template, found.ref)


def _run_tokenizer(spec: str, run_dir: Path) -> str:
    """A run's tokenizer as a path that exists where one does: the run's own copy
    (RUN_DIR/tokenizer.json, with its tokenizer_config.json / chat template beside it) first;
    else (a run from before runs kept one) data.tokenizer, relative to the run directory when it
    is there, a directory's tokenizer.json; "builtin" stays builtin (the data's cached BPE)."""
    from lmsys.data.tokenizer import BUILTIN

    if (run_dir / "tokenizer.json").is_file():
        return str((run_dir / "tokenizer.json").absolute())
    if spec == BUILTIN:
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and (run_dir / path).exists():
        path = run_dir / path
    if path.is_dir():
        path = path / "tokenizer.json"
    return str(path.absolute())
