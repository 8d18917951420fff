"""The model registry: named, versioned, aliased checkpoints backed by MLflow's model registry.

    lmsys registry register runs/tiny --name tiny-code     # -> tiny-code v1
    lmsys registry alias tiny-code prod 1
    lmsys serve models:/tiny-code@prod                     # or models:/tiny-code/1

A version records where its checkpoint step directory is, a sha256 over that directory's files,
a sha256 of every other file loading reads (config.yaml, the tokenizer, its chat template:
`lmsys.files`), the model config, the mesh it was saved with and its lineage (run dir, step,
data, final metrics, the model it was fine-tuned from). A load hashes the bytes it uses as it
reads them (the weights right after Orbax read them) and refuses a file that changed, naming it. Everything is kept as model-version tags (strings), so any MLflow tracking URI works; the
default is a local SQLite database: $LMSYS_REGISTRY_URI, else
sqlite:///~/.local/share/lmsys/registry.db. mlflow is imported only when the registry is used.

The training loop's `tracking.mlflow=true` hook, MlflowTracker, is in lmsys.interop.tracking.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmsys.checkpoint import CheckpointError

PREFIX = "models:/"
TAG = "lmsys."  # the prefix of every tag lmsys writes on a model version
INSTALL_HINT = "the model registry needs mlflow: pip install 'lmsys[registry]'"


class RegistryError(CheckpointError):
    """An unknown model, version or alias, or a path that cannot be registered."""


class ChangedCheckpointError(RegistryError):
    """A registered checkpoint whose files no longer match the hash recorded at registration."""


# ----------------------------------------------------------------------------- URIs and hashing


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lmsys"


def default_uri() -> str:
    """$LMSYS_REGISTRY_URI, else a SQLite database under the user's data directory."""
    uri = os.environ.get("LMSYS_REGISTRY_URI")
    if uri:
        return uri
    return f"sqlite:///{data_dir() / 'registry.db'}"


def prepare_uri(uri: str | None) -> str:
    uri = uri or default_uri()
    if uri.startswith("sqlite:///"):  # create the database's directory on first use
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def checkpoint_hash(step_dir: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 over a checkpoint step directory: each file's relative path (sorted), size and
    bytes, streamed."""
    root = Path(step_dir)
    return files_hash(root, [p for p in root.rglob("*") if p.is_file()], chunk)


def files_hash(root: Path, paths, chunk: int = 1 << 20) -> str:
    """sha256 over files under `root`: each one's relative path (sorted), size and bytes."""
    h = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in paths)
    for rel, p in files:
        h.update(rel.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        with p.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- references


@dataclass
class Ref:
    name: str
    version: str | None = None  # None with alias None = the latest version
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version else self.name


def parse_ref(text: str) -> Ref:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest` or `NAME` (the latest
    version); the `models:/` prefix is optional."""
    s = str(text)
    s = s.removeprefix(PREFIX)
    if "@" in s:
        name, alias = s.rsplit("@", 1)
        ref = Ref(name, alias=alias)
    elif "/" in s:
        name, version = s.rsplit("/", 1)
        if version != "latest" and not version.isdigit():
            raise RegistryError(f"'{text}' is not a model reference; use models:/NAME@ALIAS or "
                                f"models:/NAME/VERSION (a number)")
        ref = Ref(name, version=None if version == "latest" else str(int(version)))
    else:
        ref = Ref(s)
    if not ref.name or (ref.alias is not None and not ref.alias):
        raise RegistryError(f"'{text}' is not a model reference; use models:/NAME@ALIAS or "
                            f"models:/NAME/VERSION")
    return ref


def is_model_uri(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


@dataclass
class Resolved:
    """A registered model version: where its checkpoint is and what it must hash to."""

    name: str
    version: int
    path: Path  # the checkpoint step directory
    run_dir: Path
    step: int
    sha256: str
    aliases: list[str]
    tags: dict[str, str]
    description: str = ""
    created: float = 0.0  # seconds since the epoch

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    def verify(self) -> None:
        """Raises ChangedCheckpointError unless the checkpoint still hashes as registered."""
        if not self.path.is_dir():
            raise ChangedCheckpointError(
                f"checkpoint of {self} is gone ({self.path} does not exist; was it pruned by "
                f"checkpoint.keep or moved?); re-register it")
        actual = checkpoint_hash(self.path)
        if actual != self.sha256:
            raise ChangedCheckpointError(
                f"checkpoint of {self} changed since it was registered (sha256 {actual[:16]}... != "
                f"{self.sha256[:16]}...) at {self.path}; re-register it")


@dataclass
class FileCheck:
    """The files a model load reads (lmsys.checkpoint.open_model), each hashed as it is read:
    recorded (`expected` None, at registration) or checked against a version's record, so what
    is used is what was hashed. `resolved`: the version, whose weights `verify_weights` checks."""

    root: Path  # the run directory; files inside it are named relative to it
    what: str
    expected: dict[str, str] | None = None
    resolved: Resolved | None = None
    seen: dict[str, str] = field(default_factory=dict)

    def name(self, path) -> str:
        path = Path(path).absolute()
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def read(self, path) -> bytes:
        data = Path(path).read_bytes()
        self.check(self.name(path), data, path)
        return data

    def check(self, name: str, data: bytes, path=None) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.seen[name] = digest
        if self.expected is None:
            return
        want = self.expected.get(name)
        if want is None:
            raise ChangedCheckpointError(f"{name} of {self.what} was not part of it when it was registered "
                                         f"(loading reads it now); re-register it")
        if want != digest:
            where = f" at {path}" if path is not None else ""
            raise ChangedCheckpointError(f"{name} of {self.what} changed since it was registered (sha256 "
                                         f"{digest[:16]}... != {want[:16]}...){where}; re-register it")

    def check_present(self) -> None:
        """Refuses a version one of whose recorded files is gone (loading would read another)."""
        for name in sorted(self.expected or {}):
            path = Path(name) if Path(name).is_absolute() else self.root / name
            if not name.startswith("tokenizer (") and not path.is_file():
                raise ChangedCheckpointError(f"{name} of {self.what} is gone ({path} does not exist); "
                                             f"restore it or re-register")

    def verify_weights(self) -> None:
        if self.resolved is not None:
            self.resolved.verify()


# ----------------------------------------------------------------------------- the registry


def _run_dir_and_step(path: Path, step: int | None) -> tuple[Path, int | None]:
    """A run dir, or a step directory inside one (RUN/checkpoints/STEP)."""
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if step is not None and step != int(path.name):
            raise RegistryError(f"{path} is step {path.name}, not step {step}")
        return path.parent.parent, int(path.name)
    return path, step


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RegistryError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    return tree if isinstance(tree, dict) else {}


def _record_files(run_dir: Path) -> dict[str, str]:
    """{file: sha256} of what loading the run reads beside its weights: config.yaml, the
    tokenizer and its chat template, read through lmsys.checkpoint.open_model as a load does."""
    from lmsys.checkpoint import open_model

    files = FileCheck(run_dir, str(run_dir))
    try:
        found = open_model(run_dir, files=files)
        found.tokenizer()
        found.chat_template()
    except (OSError, ValueError) as e:
        raise RegistryError(f"cannot read the model files of {run_dir} ({str(e).splitlines()[0][:200]})") from None
    return files.seen


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


class Registry:
    def __init__(self, uri: str | None = None):
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise RegistryError(INSTALL_HINT) from None
        self.uri = prepare_uri(uri)
        self._mlflow_error = MlflowException
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- errors: MLflow's exceptions become one-line RegistryErrors

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._mlflow_error as e:
            code = getattr(e, "error_code", "")
            msg = str(getattr(e, "message", e)).splitlines()[0]
            if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in msg:
                raise RegistryError(f"{what}: {msg} (registry {self.uri}); see `lmsys registry list`") from None
            raise RegistryError(f"{what}: {msg} (registry {self.uri})") from None

    # -- writing

    def register(self, path: str | Path, name: str, step: int | None = None,
                 description: str = "") -> Resolved:
        """Registers the latest (or given) checkpoint of a run dir (or `convert from-hf` output,
        or a RUN/checkpoints/STEP directory) as the next version of `name`."""
        import orbax.checkpoint as ocp

        run_dir, step = _run_dir_and_step(Path(path).expanduser().absolute(), step)
        if not (run_dir / "config.yaml").is_file():
            raise RegistryError(f"{run_dir} is not an lmsys run directory (no config.yaml); pass the "
                                f"run_dir of `lmsys train` or the output of `lmsys convert from-hf`")
        if not (run_dir / "checkpoints").is_dir():
            raise RegistryError(f"{run_dir} has no checkpoints/ yet; train or convert into it first")
        config = _read_yaml(run_dir / "config.yaml")
        # Read-only: finished steps are the directories named by a number (Orbax renames a step's
        # temporary directory when it is complete); a training run may be writing beside them.
        steps = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir()
                       if d.name.isdigit() and d.is_dir())
        if not steps or (step is not None and step not in steps):
            raise RegistryError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in "
                                f"{run_dir / 'checkpoints'} (steps there: {steps or 'none'})")
        step = steps[-1] if step is None else step
        step_dir = run_dir / "checkpoints" / str(step)
        try:
            meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
        except Exception as e:  # noqa: BLE001 - any unreadable meta is the same problem
            raise RegistryError(f"cannot read the checkpoint meta of {step_dir} "
                                f"({str(e).splitlines()[0][:200]})") from None
        files = _record_files(run_dir)
        data = config.get("data") or {}
        model = meta.get("model") or config.get("model") or {}
        tags = {
            "sha256": checkpoint_hash(step_dir),
            "files": json.dumps(files, sort_keys=True),
            "checkpoint": str(step_dir),
            "run_dir": str(run_dir),
            "step": str(step),
            "model_config": json.dumps(model, sort_keys=True),
            "mesh": json.dumps(meta.get("mesh") or {}),
            "data_source": str(data.get("source", "")),
            "data_tokenizer": str(data.get("tokenizer", "")),
            "final_metrics": json.dumps(_last_metrics(run_dir)),
            "parent": self._parent(str(config.get("init_from") or "")),
        }
        tags = {TAG + k: v for k, v in tags.items()}
        try:
            self.client.get_registered_model(name)
        except self._mlflow_error:
            self._call(f"cannot create model '{name}'", self.client.create_registered_model, name)
        mv = self._create_version(name, str(step_dir), tags, description)
        return self.resolve(f"{name}/{mv.version}")

    def _create_version(self, name: str, source: str, tags: dict, description: str):
        try:
            return self.client.create_model_version(name, source, tags=tags,
                                                    description=description or None)
        except self._mlflow_error as e:
            if "local path as a model version source" not in str(e):
                msg = str(getattr(e, "message", e)).splitlines()[0]
                raise RegistryError(f"cannot register {name}: {msg} (registry {self.uri})") from None
        # a tracking server refuses local paths as sources: the tag keeps the real path
        return self._call(f"cannot register {name}", self.client.create_model_version, name,
                          "lmsys://" + source, tags=tags, description=description or None)

    def _parent(self, init_from: str) -> str:
        """The model a run was fine-tuned from: `models:/NAME/VERSION` when it is a registered
        model (an alias is pinned to the version it points to now), else the path as given."""
        if not init_from:
            return ""
        if is_model_uri(init_from):
            try:
                r = self.resolve(init_from)
                return f"{PREFIX}{r.name}/{r.version}"
            except RegistryError:
                return init_from
        path = Path(init_from).expanduser().absolute()
        candidates = {str(path), str(path.parent.parent) if path.parent.name == "checkpoints" else ""}
        found = []
        for mv in self._versions():
            t = mv.tags or {}
            if t.get(TAG + "checkpoint") == str(path) or t.get(TAG + "run_dir") in candidates:
                found.append((int(t.get(TAG + "step", -1)), int(mv.version), mv.name))
        if found:
            _, version, name = max(found)  # the latest step of that run, its newest version
            return f"{PREFIX}{name}/{version}"
        return str(path)

    def alias(self, name: str, alias: str, version: int | str) -> Resolved:
        if alias.isdigit() or alias == "latest":
            raise RegistryError(f"alias '{alias}' would read as a version; choose a name like 'prod'")
        resolved = self.resolve(f"{name}/{version}")
        self._call(f"cannot set alias {name}@{alias}", self.client.set_registered_model_alias,
                   name, alias, str(resolved.version))
        return self.resolve(f"{name}@{alias}")

    def log_eval(self, ref: str | Ref, metrics: dict[str, float]) -> Resolved:
        """Adds evaluation metrics (`lmsys eval --register`) to a version's `eval` tag, keeping
        earlier ones it does not replace."""
        r = self.resolve(ref)
        merged = {**json.loads(r.tags.get(TAG + "eval") or "{}"), **metrics}
        self._call(f"cannot tag {r}", self.client.set_model_version_tag, r.name, str(r.version),
                   TAG + "eval", json.dumps(merged, sort_keys=True))
        return self.resolve(f"{r.name}/{r.version}")

    def delete(self, name: str, version: int | str | None = None) -> None:
        """Deletes a version (or the whole model) from the registry; checkpoint files stay."""
        if version is None:
            self._call(f"unknown model '{name}'", self.client.get_registered_model, name)
            self._call(f"cannot delete {name}", self.client.delete_registered_model, name)
        else:
            resolved = self.resolve(f"{name}/{version}")
            self._call(f"cannot delete {resolved}", self.client.delete_model_version, name,
                       str(resolved.version))

    # -- reading

    def _versions(self, name: str | None = None) -> list:
        flt = None if name is None else "name='{}'".format(name.replace("'", "\\'"))
        return list(self._call("cannot search the registry", self.client.search_model_versions, flt))

    def list(self) -> list[dict]:
        """One dict per registered model: name, latest version, aliases ({alias: version})."""
        out = []
        models = self._call("cannot list the registry", self.client.search_registered_models,
                            max_results=1000)
        for rm in sorted(models, key=lambda m: m.name):
            versions = [int(mv.version) for mv in self._versions(rm.name)]
            out.append({"name": rm.name, "latest": max(versions) if versions else None,
                        "versions": len(versions),
                        "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())}})
        return out

    def resolve(self, ref: str | Ref) -> Resolved:
        """A reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `NAME`) -> its version."""
        r = ref if isinstance(ref, Ref) else parse_ref(ref)
        if r.alias:
            self._call(f"unknown model '{r.name}'", self.client.get_registered_model, r.name)
            mv = self._call(f"model '{r.name}' has no alias '{r.alias}'",
                            self.client.get_model_version_by_alias, r.name, r.alias)
        elif r.version:
            self._call(f"unknown model '{r.name}'", self.client.get_registered_model, r.name)
            mv = self._call(f"model '{r.name}' has no version {r.version}",
                            self.client.get_model_version, r.name, r.version)
        else:
            self._call(f"unknown model '{r.name}'", self.client.get_registered_model, r.name)
            versions = self._versions(r.name)
            if not versions:
                raise RegistryError(f"model '{r.name}' has no versions; register one")
            mv = max(versions, key=lambda v: int(v.version))
        tags = dict(mv.tags or {})
        if TAG + "sha256" not in tags:
            raise RegistryError(f"{r.name} v{mv.version} was not registered by lmsys (no "
                                f"{TAG}sha256 tag); register it with `lmsys registry register`")
        aliases = list(mv.aliases or [])
        path, run_dir, step = Path(tags[TAG + "checkpoint"]), Path(tags[TAG + "run_dir"]), tags[TAG + "step"]
        if path != run_dir / "checkpoints" / step:
            raise RegistryError(f"{r.name} v{mv.version}'s tags disagree: checkpoint {path} is not step "
                                f"{step} of run dir {run_dir}; re-register it")
        return Resolved(name=mv.name, version=int(mv.version), path=Path(tags[TAG + "checkpoint"]),
                        run_dir=Path(tags[TAG + "run_dir"]), step=int(tags[TAG + "step"]),
                        sha256=tags[TAG + "sha256"], aliases=sorted(aliases), tags=tags,
                        description=mv.description or "",
                        created=(mv.creation_timestamp or 0) / 1000)

    def show(self, ref: str | Ref) -> str:
        """Readable plain text about one version (`NAME` alone: its latest)."""
        from lmsys.interop.registry_cli import format_version

        return format_version(self.resolve(ref))


def resolve_checked(ref: str, uri: str | None = None) -> tuple[Resolved, FileCheck]:
    """A `models:/` reference for loading: its version, whose checkpoint and recorded files
    must still be there, and the FileCheck that lmsys.checkpoint.open_model reads its files
    through (each checked as read, the weights after they are read)."""
    resolved = Registry(uri).resolve(ref)
    if not resolved.path.is_dir():
        resolved.verify()  # says it is gone
    recorded = resolved.tags.get(TAG + "files")
    files = FileCheck(resolved.run_dir, str(resolved), json.loads(recorded) if recorded else None, resolved)
    files.check_present()
    return resolved, files
