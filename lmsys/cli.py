"""The `lmsys` command line.

    lmsys train CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from lmsys.config import load_config
    from lmsys.train.loop import train

    cfg = load_config(args.config, args.overrides)
    history = train(cfg, progress=not args.no_progress)
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; run dir {cfg.run_dir}")
    else:
        print(f"nothing to do: {cfg.run_dir} is already at step {cfg.steps}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model; re-run the same command to resume")
    p.add_argument("config", help="a YAML config file, e.g. recipes/configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=4 steps=200")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    args = parser.parse_args(argv)

    from lmsys.checkpoint import CheckpointError
    from lmsys.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"lmsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmsys {args.command}: interrupted; re-run the same command to resume from the "
              "last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
