"""The `lmsys` command line.

    lmsys train CONFIG.yaml [key=value ...]
    lmsys rl CONFIG.yaml [key=value ...]          # GRPO from rewards (recipes/configs/grpo*.yaml)
    lmsys eval MODEL --source PATHS | --tasks TASKS [--register]
    lmsys generate RUN_DIR --prompt "def fib(" --max-tokens 64 --temperature 0
    lmsys serve RUN_DIR --port 8000 [--api-key KEY | --api-keys FILE] [--max-queue 256]
    lmsys convert from-hf HF_DIR OUT_DIR          # then `lmsys generate OUT_DIR ...`
    lmsys convert to-hf RUN_DIR OUT_DIR [--dtype bfloat16] [--merge]   # a LoRA run: a PEFT adapter dir
    lmsys registry register RUN_DIR --name NAME   # then: alias, list, show, delete
    lmsys serve models:/NAME@ALIAS [--follow]     # serve and generate take models:/NAME/VERSION too
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    from lmsys.config import load_config
    from lmsys.train.loop import train

    cfg = load_config(args.config, args.overrides)
    history = train(cfg, progress=not args.no_progress)
    import jax

    if jax.process_index() != 0:  # in a multi-process job only process 0 reports
        return 0
    if history:
        last = [r for r in history if "loss" in r][-1]
        evals = [r for r in history if "eval_loss" in r]
        held = (f"; held-out loss {evals[-1]['eval_loss']:.4f}, {evals[-1]['eval_bits_per_byte']:.4f} "
                f"bits per byte" if evals else "")
        print(f"step {last['step']}: loss {last['loss']:.4f}{held}; run dir {cfg.run_dir}")
    else:
        print(f"nothing to do: {cfg.run_dir} is already at step {cfg.steps}")
    from lmsys.checkpoint import is_url

    # one process only: a sample on process 0 alone would keep the others waiting at shutdown
    if cfg.eval.sample and jax.process_count() == 1 and not is_url(cfg.run_dir):
        from lmsys.eval.runner import greedy_sample

        print(f"greedy sample: {cfg.eval.sample}{greedy_sample(cfg.run_dir, cfg.eval.sample)}", flush=True)
    return 0


def _rl(args) -> int:
    from lmsys.config import load_config
    from lmsys.rl.loop import rl

    cfg = load_config(args.config, args.overrides)
    history = rl(cfg, progress=not args.no_progress)
    if history:  # one step's mean is noisy: the first and the last quarter of this run's steps
        k = max(1, len(history) // 4)
        mean = lambda rows: sum(r["reward_mean"] for r in rows) / len(rows)  # noqa: E731
        print(f"step {history[-1]['step']}: reward_mean {mean(history[:k]):.3f} (steps {history[0]['step']}-"
              f"{history[k - 1]['step']}) -> {mean(history[-k:]):.3f} (steps {history[-k]['step']}-"
              f"{history[-1]['step']}); run dir {cfg.run_dir}")
    else:
        print(f"nothing to do: {cfg.run_dir} is already at step {cfg.steps}")
    return 0


def _engine(args, max_slots: int, batch_invariant: bool = False, fine_prefill_widths: bool = False):
    """A run directory's model in an engine configured by the shared serving flags."""
    from lmsys.config import ConfigError
    from lmsys.serve.engine import Engine, EngineConfig
    from lmsys.checkpoint import load_model

    rules = _serving_rules(args.data_parallel, args.tensor_parallel)
    if max_slots % args.data_parallel:
        raise ConfigError(f"--max-slots {max_slots} must be a multiple of --data-parallel "
                          f"{args.data_parallel} (each group serves max-slots / data-parallel slots)")
    if args.num_speculative_tokens < 1:
        raise ConfigError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if (args.speculative == "draft") != bool(args.draft_model):
        raise ConfigError("--speculative draft goes with --draft-model PATH (a smaller model of the same tokenizer)")
    model = load_model(args.model)
    draft = None
    if args.draft_model:
        from lmsys.serve.draft import DraftModel

        small = load_model(args.draft_model)
        draft = DraftModel(small.params, small.config.model, small.tokenizer)
    config = EngineConfig(max_slots=max_slots, page_size=args.page_size, num_pages=args.num_pages,
                          max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                          prefill_tokens=args.prefill_tokens,
                          batch_invariant=batch_invariant, fine_prefill_widths=fine_prefill_widths,
                          dtype=model.config.dtype,
                          quantize=args.quantize, prefix_cache=not args.no_prefix_cache,
                          speculative=args.speculative,
                          num_speculative_tokens=args.num_speculative_tokens)
    bank = None
    if getattr(args, "lora", None):  # `lmsys serve --lora NAME=PATH`: adapters on the base
        from lmsys.serve.lora import adapter_bank

        bank = adapter_bank(args.lora, args.max_loras, model.config.model)
    return model, Engine(model.params, model.config.model, model.tokenizer, config, rules=rules,
                         eos_token_id=model.eos_token_id, adapters=bank, draft=draft)


def _serving_rules(data: int, tensor: int):
    """Rules over a data x tensor mesh of the first data*tensor devices, or None for one."""
    from lmsys.config import ConfigError

    if data < 1 or tensor < 1:
        raise ConfigError(f"--data-parallel {data} --tensor-parallel {tensor}: both must be >= 1")
    if data * tensor == 1:
        return None
    import jax

    from lmsys.config import MeshConfig
    from lmsys.parallel import Rules, build_mesh

    if data * tensor > jax.device_count():
        raise ConfigError(f"--data-parallel {data} x --tensor-parallel {tensor} needs "
                          f"{data * tensor} devices; this machine has {jax.device_count()}")
    mesh = build_mesh(MeshConfig(data=data, fsdp=1, tensor=tensor),
                      jax.devices()[:data * tensor])
    return Rules(mesh)


def _generate(args) -> int:
    from lmsys.serve.scheduler import GenerationOptions

    dp = args.data_parallel  # one slot per prompt, rounded up to whole data-parallel groups
    _, engine = _engine(args, max_slots=-(-len(args.prompt) // dp) * dp)
    options = GenerationOptions(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=tuple(args.stop))
    stream = len(args.prompt) == 1
    reqs = []
    for prompt in args.prompt:
        on_event = (lambda e: print(e.text, end="", flush=True)) if stream else None
        if stream:
            print(prompt, end="", flush=True)
        reqs.append(engine.add_request(engine.encode(prompt), options, on_event))
    while engine.has_work():
        engine.step()
    if stream:
        print()
    else:
        for prompt, req in zip(args.prompt, reqs):
            print(f"--- {prompt!r} ({req.finish_reason})\n{prompt}{req.text}")
    return 0


def _serve(args) -> int:
    from lmsys.config import ConfigError
    from lmsys.serve.api import Limits
    from lmsys.serve.gate import KeyFileError, KeyRing, load_api_keys
    from lmsys.serve.server import create_app, run_app

    try:  # before loading the model: a bad key or keys file fails at once
        if args.api_keys and args.api_key is not None:
            raise ConfigError("give --api-key (or $LMSYS_API_KEY) or --api-keys, not both")
        keys = (load_api_keys(args.api_keys) if args.api_keys
                else KeyRing.single(args.api_key) if args.api_key is not None else None)
    except KeyFileError as e:
        raise ConfigError(str(e)) from None
    given = {"max_queue": args.max_queue, "max_choices": args.max_choices, "request_timeout": args.request_timeout,
             "max_hidden_values": args.max_hidden_values,
             "max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 2**20)}
    for name, value in given.items():
        if value is not None and (value < 0 or (value == 0 and name != "request_timeout")):
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    limits = Limits(**{k: v for k, v in given.items() if v is not None}, embed_pooling=args.embed_pooling)
    if args.follow:
        from lmsys.serve import follow

        try:
            follow.check_followable(args.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if args.follow_interval <= 0 or args.follow_max_wait < 0:
            raise ConfigError(f"--follow-interval must be > 0 and --follow-max-wait >= 0, got "
                              f"{args.follow_interval} and {args.follow_max_wait}")
    model, engine = _engine(args, args.max_slots, args.batch_invariant)
    print(f"{model.name} (step {model.step}): {engine.num_pages} KV pages of {args.page_size} tokens, "
          f"{args.max_slots} slots, queue of {limits.max_queue}", flush=True)
    engine.warmup(progress=not args.no_progress)
    app = create_app(engine, args.name or model.name, model.tokenizer, chat_template=model.chat_template,
                     keys=keys, limits=limits, public_metrics=args.public_metrics)
    from lmsys.serve.follow import Follower, describe, log_to_stderr

    describe(app, model)  # a registered model's version on /v1/models
    if args.follow:
        log_to_stderr()
    follower = (Follower(app, args.model, model, interval=args.follow_interval,
                         max_wait=args.follow_max_wait).start() if args.follow else None)
    try:
        return run_app(app, args.host, args.port)
    finally:
        if follower:
            follower.stop()


def _eval(args) -> int:
    from lmsys.eval.runner import run_eval

    model, engine = _engine(args, args.max_slots, fine_prefill_widths=True)
    run_eval(args, model, engine)
    return 0


def _convert(args) -> int:
    from lmsys.interop.convert import hf_to_lmsys, lmsys_to_hf

    if args.direction == "from-hf":
        out = hf_to_lmsys(args.src, args.out)
        print(f"wrote lmsys checkpoint {out}; try: lmsys generate {out} --prompt 'Hello'")
    else:
        out = lmsys_to_hf(args.src, args.out, dtype=args.dtype, step=args.step,
                          max_shard_size=int(args.max_shard_size_mb * 2**20), merge=args.merge)
        print(f"wrote Hugging Face {'PEFT adapter' if (out / 'adapter_config.json').is_file() else 'model'} {out}")
    return 0


def _engine_flags(p) -> None:
    p.add_argument("model", help="a training run directory (e.g. runs/tiny), the output of "
                                 "`lmsys convert from-hf`, a Hugging Face model directory, or a "
                                 "registered model (models:/NAME@ALIAS, models:/NAME/VERSION)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=0, help="KV pages; 0 = from free device memory")
    p.add_argument("--max-seq-len", type=int, default=1024, help="prompt + generated tokens")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens of one request per prefill call")
    p.add_argument("--prefill-tokens", type=int, default=0,
                   help="prompt tokens of all requests per prefill call (several requests' chunks "
                        "are prefilled together); 0 = 4 x --prefill-chunk")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "fp8"],
                   help="weight-only quantization of the matrices")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt (default: reuse the KV pages of prompt prefixes "
                        "seen before, kept until the pool needs them)")
    p.add_argument("--speculative", default="none", choices=["none", "ngram", "draft"],
                   help="speculative decoding: ngram drafts tokens by prompt lookup (what followed "
                        "the last tokens earlier in the context), draft by a smaller model "
                        "(--draft-model); the served model verifies them in one call")
    p.add_argument("--draft-model", default="",
                   help="with --speculative draft: the draft model (a run directory, models:/ "
                        "reference or Hugging Face directory, as MODEL) of the same tokenizer")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="drafted tokens per request and step at most (with --speculative)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="devices that split each model's heads and MLP (mesh axis `tensor`)")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="groups of slots, each with its own share of the KV pages (mesh axis "
                        "`data`); devices used: data x tensor")


def _plan(args) -> int:
    import json

    from lmsys.plan import planner
    from lmsys.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.topology:
        if args.devices is not None:
            raise planner.PlanError("--devices comes from --topology (its chips); leave it out")
        hw = args.hardware or args.topology.split(":")[0]
        if hw not in planner.HARDWARE:
            raise planner.PlanError(f"no datasheet figures for {hw!r} (from --topology); pass --hardware")
        plans = (planner.search_topology(cfg, args.topology, hw) if args.search
                 else [planner.plan_topology(cfg, args.topology, hw)])
    else:
        devices = args.devices or 1
        hw = args.hardware or "h100"
        plans = planner.search(cfg, devices, hw) if args.search else [planner.analyze(cfg, devices, hw)]
    if args.json:
        print(json.dumps([{"config": to_dict(p.cfg), "mesh": p.sizes, "hardware": p.hardware.name,
                           "memory": p.memory, "total_memory": p.total_memory, "fits": p.fits,
                           "collectives": p.collectives, "flops": p.flops, "step_time": p.step_time,
                           "mfu": p.mfu, "compiled": p.compiled} for p in plans[:args.top]], indent=1))
    elif args.search:
        print(planner.render_search(plans, args.top))
    else:
        print(planner.render(plans[0]))
    return 0 if args.search and plans or not args.search and plans[0].fits else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model; re-run the same command to resume")
    p.add_argument("config", help="a YAML config file, e.g. recipes/configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=4 steps=200")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("rl", help="GRPO from rewards, sampling with the serving engine in this process; "
                                  "re-run the same command to resume")
    p.add_argument("config", help="a YAML config file, e.g. recipes/configs/grpo-arith.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.reward=my_rewards:score")
    p.add_argument("--no-progress", action="store_true", help="no per-step line")
    p.set_defaults(func=_rl)

    p = sub.add_parser("generate", help="generate text from a trained run directory")
    _engine_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="serve a trained run directory over an OpenAI-compatible HTTP API")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter (a LoRA run, a PEFT adapter dir or models:/NAME@ALIAS) beside "
                        "the base; a request's `model` NAME picks it (repeatable)")
    p.add_argument("--max-loras", type=int, default=0,
                   help="adapter slots (0 = the number of --lora); the bank's shapes are fixed at start-up")
    p.add_argument("--api-key", default=os.environ.get("LMSYS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LMSYS_API_KEY; none = open)")
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="one key per line: 'NAME KEY [rpm=N] [tpm=N]' (per-key limits per minute)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key")
    p.add_argument("--max-queue", type=int, default=None, help="requests (prompts x n) waiting for a slot "
                   "at most, beyond: 429 + Retry-After (default 256)")
    p.add_argument("--max-body-mb", type=float, default=None, help="request body size at most, beyond: 413 "
                   "(default 4)")
    p.add_argument("--max-choices", type=int, default=None, help="prompts x n of one request at most (default 64)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take, arrival "
                   "to last token, then 408 (default 600; 0 = none)")
    p.add_argument("--name", default=None, help="the model id clients use (default: the run dir's name)")
    p.add_argument("--max-hidden-values", type=int, default=None, help="floats of return_hidden_states one "
                   "completions request may ask for (default 2^22)")
    p.add_argument("--embed-pooling", choices=("last", "mean"), default=None,
                   help="/v1/embeddings: the last token's final hidden state, or the mean over the tokens "
                        "(default: the model's model.embed_pooling, else last)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--batch-invariant", action="store_true",
                   help="one shape per call: a request's output never depends on the others")
    p.add_argument("--no-progress", action="store_true", help="no warm-up progress bar")
    p.add_argument("--follow", action="store_true",
                   help="with models:/NAME@ALIAS: serve the version the alias points to as it moves "
                        "(loaded and verified beside the served one, swapped in once the running "
                        "requests finish)")
    p.add_argument("--follow-interval", type=float, default=30.0, help="seconds between registry polls")
    p.add_argument("--follow-max-wait", type=float, default=60.0,
                   help="seconds a swap waits for the running requests; those left then get a 503")
    p.set_defaults(func=_serve)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on text; lm-eval tasks")
    _engine_flags(p)
    from lmsys.eval.runner import add_arguments as add_eval_arguments

    add_eval_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("convert", help="convert checkpoints from/to Hugging Face safetensors")
    p.add_argument("direction", choices=["from-hf", "to-hf"],
                   help="from-hf: HF model dir -> lmsys checkpoint dir; to-hf: lmsys model -> HF model dir")
    p.add_argument("src", metavar="SRC", help="from-hf: a Hugging Face model directory; to-hf: a run directory "
                        "or a registered model (models:/NAME@ALIAS)")
    p.add_argument("out", metavar="OUT_DIR", help="the directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="to-hf: the dtype of the written tensors")
    p.add_argument("--step", type=int, default=None, help="to-hf: the checkpoint step (default: latest)")
    p.add_argument("--merge", action="store_true",
                   help="to-hf of a LoRA run or a PEFT adapter: full weights with the adapters merged in "
                        "(default for a LoRA run: a PEFT adapter directory)")
    p.add_argument("--max-shard-size-mb", type=float, default=5120,
                   help="to-hf: split model.safetensors into files of at most this size")
    p.set_defaults(func=_convert)

    p = sub.add_parser("plan", help="per-device memory, collectives and step time of a training "
                                    "config before running it; --search ranks meshes that fit")
    p.add_argument("config", help="a YAML config file, e.g. recipes/configs/llama3-8b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=8 remat=full")
    p.add_argument("--devices", type=int, default=None, help="devices to plan for (default: the topology's chips)")
    p.add_argument("--hardware", default=None, choices=["h100", "h200", "a100", "v5e", "v5p", "v6e"],
                   help="accelerator (default: the topology's, else h100)")
    p.add_argument("--topology", default=None,
                   help="a TPU topology, e.g. v5p:4x4x4 (chips): also compile the train step for it "
                        "ahead of time on this machine (needs the `tpu` extra) and print both")
    p.add_argument("--search", action="store_true", help="rank data x fsdp x tensor meshes and remat "
                                                          "policies that fit, best first (with --topology: "
                                                          "compile the best ones until one fits)")
    p.add_argument("--top", type=int, default=5, help="--search: plans to print")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    from lmsys.interop.registry_cli import add_parser as add_registry_parser

    add_registry_parser(sub)
    args = parser.parse_args(argv)

    from lmsys.checkpoint import CheckpointError
    from lmsys.config import ConfigError
    from lmsys.plan.planner import PlanError
    from lmsys.serve.scheduler import RequestError
    from lmsys.train.loop import TrainingError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, RequestError, PlanError) as e:
        print(f"lmsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"lmsys {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = "; re-run the same command to resume from the last checkpoint" if args.command in ("train", "rl") else ""
        print(f"lmsys {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
