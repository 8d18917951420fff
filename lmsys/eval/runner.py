"""`lmsys eval MODEL`: loss, perplexity and bits per byte on text (`--source`), lm-eval tasks
in-process (`--tasks`), the metrics onto the registry version (`--register`); and the greedy
sample `lmsys train` prints at the end (`eval.sample`).

    lmsys eval runs/tiny --source data/heldout/
    lmsys eval models:/tiny-code@prod --tasks my_task.yaml,arc_easy --limit 200 --register
"""

from __future__ import annotations

import json
from pathlib import Path

from lmsys.config import ConfigError


def run_eval(args, model, engine) -> dict:
    """Runs what `args` asks on the loaded model and its engine; returns the flat metrics."""
    if not args.source and not args.tasks:
        raise ConfigError("lmsys eval: nothing to evaluate; pass --source PATHS and/or --tasks TASKS")
    if args.register and not str(args.model).startswith("models:/"):
        raise ConfigError(f"--register logs onto a registered version; {args.model} is not one: pass "
                          f"models:/NAME@ALIAS (register the run first with `lmsys registry register`)")
    out = Path(args.output)
    metrics: dict[str, float] = {}
    if args.source:
        metrics.update(source_metrics(args, model, engine))
    if args.tasks:
        metrics.update(task_results(args, model, engine, out))
    if args.register:
        from lmsys.interop.registry import Registry

        r = Registry(args.uri).log_eval(args.model, metrics)
        print(f"logged {len(metrics)} metrics onto {r}", flush=True)
    return metrics


def source_metrics(args, model, engine) -> dict[str, float]:
    from lmsys.data import iter_documents
    from lmsys.eval.scoring import Scorer, text_metrics

    limit = int(args.limit) if args.limit else 0
    docs = list(iter_documents(args.source, args.text_field, limit))
    m = text_metrics(Scorer(engine), docs, model.eos_token_id)
    print(f"{args.source}: {m.documents} documents, {m.tokens} tokens, {m.bytes} bytes: loss {m.loss:.4f}, "
          f"perplexity {m.perplexity:.4f}, bits per byte {m.bits_per_byte:.4f}", flush=True)
    path = Path(args.output) / "text_metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": str(args.model), "source": args.source, **m.as_dict()}, indent=1))
    return {"text/loss": m.loss, "text/perplexity": m.perplexity, "text/bits_per_byte": m.bits_per_byte}


def task_results(args, model, engine, out: Path) -> dict[str, float]:
    try:
        from lmsys.eval.harness import LmsysLM, run_tasks, save_results, task_metrics
    except ImportError:
        raise ConfigError("--tasks runs lm-evaluation-harness: pip install 'lmsys[eval]'") from None
    from lm_eval.utils import make_table

    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    try:
        results = run_tasks(LmsysLM(engine, model.eos_token_id, model.chat_template), specs, limit=limit,
                            num_fewshot=args.num_fewshot, log_samples=True,
                            apply_chat_template=args.apply_chat_template)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    save_results(results, str(out))
    print(make_table(results), flush=True)
    print(f"results written under {out}", flush=True)
    return task_metrics(results)


def greedy_sample(run_dir: str, prompt: str, max_tokens: int = 48) -> str:
    """The greedy continuation of `prompt` by the latest checkpoint of a run."""
    from lmsys.checkpoint import load_model
    from lmsys.serve.engine import Engine, EngineConfig
    from lmsys.serve.scheduler import GenerationOptions

    m = load_model(run_dir)
    n = len(m.tokenizer.encode(prompt, add_special_tokens=False).ids)
    engine = Engine(m.params, m.config.model, m.tokenizer,
                    EngineConfig(max_slots=1, max_seq_len=-(-(n + max_tokens) // 16) * 16),
                    eos_token_id=m.eos_token_id)
    (req,) = engine.generate([prompt], GenerationOptions(max_tokens=max_tokens, temperature=0.0))
    return req.text


def add_arguments(p) -> None:
    """`lmsys eval`'s own flags (the model and engine flags come from lmsys.cli)."""
    p.add_argument("--source", default=None,
                   help="text to score: .txt/.jsonl files or directories, comma-separated (as data.source)")
    p.add_argument("--text-field", default="text", help="--source: the text field of .jsonl lines")
    p.add_argument("--tasks", default=None,
                   help="lm-eval tasks, comma-separated: names from its registry or task YAML files")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction below 1: of each task); --source: documents")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval: render each prompt as a chat through the model's chat template "
                        "(as `lmsys serve`'s /v1/chat/completions does)")
    p.add_argument("--output", default="eval_results", help="directory for the results JSON")
    p.add_argument("--max-slots", type=int, default=32, help="requests scored together at most")
    p.add_argument("--register", action="store_true",
                   help="log the metrics onto the registered version (MODEL must be models:/...)")
    p.add_argument("--uri", default=None, help="--register: the registry URI")
