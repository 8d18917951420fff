"""`lmsys registry register|alias|list|show|delete`: the command line of lmsys.interop.registry
and its plain-text tables."""

from __future__ import annotations

import json
import time

from lmsys.interop.registry import TAG, Registry, Resolved


def format_version(r: Resolved) -> str:
    t = {k[len(TAG):]: v for k, v in r.tags.items() if k.startswith(TAG)}
    mesh = json.loads(t.get("mesh") or "{}")
    metrics = json.loads(t.get("final_metrics") or "{}")
    evals = json.loads(t.get("eval") or "{}")  # lmsys eval --register
    metrics_text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in metrics.items() if v is not None) or "-"
    rows = [
        ("checkpoint", str(r.path)),
        ("sha256", r.sha256),
        ("files", ", ".join(sorted(json.loads(t.get("files") or "{}"))) or "-"),
        ("step", str(r.step)),
        ("run dir", str(r.run_dir)),
        ("mesh", " ".join(f"{k}={v}" for k, v in mesh.items()) or "-"),
        ("data", f"source={t.get('data_source') or '-'} tokenizer={t.get('data_tokenizer') or '-'}"),
        ("metrics", metrics_text),
        ("eval", " ".join(f"{k}={v:.4g}" for k, v in sorted(evals.items())) or "-"),
        ("parent", t.get("parent") or "-"),
        ("model", t.get("model_config", "{}")),
        ("registered", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.created))),
    ]
    if r.description:
        rows.append(("description", r.description))
    aliases = f"  (aliases: {', '.join(r.aliases)})" if r.aliases else ""
    return "\n".join([f"{r.name} v{r.version}{aliases}"] + [f"  {k:<11} {v}" for k, v in rows])


def format_list(models: list[dict]) -> str:
    if not models:
        return "no registered models"
    rows = [("NAME", "LATEST", "VERSIONS", "ALIASES")]
    for m in models:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in m["aliases"].items()) or "-"
        rows.append((m["name"], f"v{m['latest']}" if m["latest"] else "-", str(m["versions"]), aliases))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}"
                     for r in rows)



def cli(args) -> int:
    """`lmsys registry register|alias|list|show|delete` (args from lmsys.cli)."""
    import logging

    try:
        import mlflow  # noqa: F401 - sets up its loggers on import; quiet the database set-up
    except ImportError:
        pass  # Registry() says how to install it
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    reg = Registry(args.uri)
    if args.action == "register":
        r = reg.register(args.run_dir, args.name, step=args.step, description=args.description)
        print(f"registered {r} (step {r.step}, sha256 {r.sha256[:16]}...) from {r.path}")
        print(f"load it as models:/{r.name}/{r.version}; name it: lmsys registry alias {r.name} prod {r.version}")
    elif args.action == "alias":
        r = reg.alias(args.name, args.alias, args.version)
        print(f"{r.name}@{args.alias} -> v{r.version}")
    elif args.action == "list":
        print(format_list(reg.list()))
    elif args.action == "show":
        print(reg.show(args.ref))
    elif args.action == "delete":
        reg.delete(args.name, args.version)
        what = f"{args.name} v{args.version}" if args.version is not None else f"model {args.name}"
        print(f"deleted {what} from the registry (checkpoint files are untouched)")
    return 0


def add_parser(sub) -> None:
    """The `registry` subcommand group on lmsys.cli's subparsers."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--uri", default=None,
                        help="MLflow tracking/registry URI (default: $LMSYS_REGISTRY_URI or "
                             "sqlite:///~/.local/share/lmsys/registry.db)")
    p = sub.add_parser("registry", help="register, alias, list, show and delete model versions")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("register", parents=[common], help="register a run dir's checkpoint as a new version")
    a.add_argument("run_dir", help="a training run dir, `convert from-hf` output or RUN/checkpoints/STEP")
    a.add_argument("--name", required=True, help="the registered model's name, e.g. tiny-code")
    a.add_argument("--step", type=int, default=None, help="the checkpoint step (default: latest)")
    a.add_argument("--description", default="")
    a = acts.add_parser("alias", parents=[common], help="point ALIAS (e.g. prod) at VERSION")
    a.add_argument("name")
    a.add_argument("alias")
    a.add_argument("version", type=int)
    acts.add_parser("list", parents=[common], help="registered models, latest versions, aliases")
    a = acts.add_parser("show", parents=[common], help="one version: NAME@ALIAS, NAME/VERSION or NAME")
    a.add_argument("ref")
    a = acts.add_parser("delete", parents=[common], help="delete a version, or the whole model")
    a.add_argument("name")
    a.add_argument("version", nargs="?", type=int, default=None)
    p.set_defaults(func=cli)
