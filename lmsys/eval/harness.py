"""lm-evaluation-harness on lmsys's engine: `LmsysLM`, an `lm_eval` `TemplateLM`, and
`run_tasks`, which runs lm-eval tasks (names from its registry, or local task YAML files)
in-process and returns lm-eval's results dict. Needs the `eval` extra (lm-eval); imported only
by `lmsys eval --tasks`.

Tokenization follows lm-eval's `hf` model (TemplateLM's context/continuation split, no special
tokens added, the end-of-text token as the prefix of an empty context and of rolling
documents), so per-request log-likelihoods equal `hf`'s on the same weights exported with
`lmsys convert to-hf`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from lm_eval.api.model import TemplateLM

from lmsys.data.chat_template import ChatTemplate
from lmsys.eval.scoring import Scorer
from lmsys.serve.scheduler import GenerationOptions

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's `hf` model


class LmsysLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until (greedy) through an Engine.
    Every list of requests is handed to the engine at once: its scheduler batches them.
    `chat_template`: the model's (None: lmsys's default), for lm-eval's `apply_chat_template`,
    rendered as `lmsys serve`'s chat route renders it."""

    def __init__(self, engine, eos_token_id: int, chat_template: str | None = None):
        super().__init__()
        self.engine, self.scorer, self._eot = engine, Scorer(engine), int(eos_token_id)
        self._template = chat_template
        self.chat = ChatTemplate.for_model(chat_template, engine.tokenizer, self._eot)

    @property
    def tokenizer_name(self) -> str:
        return "lmsys"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.chat.render(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        out = [lp for lp, _ in self.scorer.rolling(docs, self.prefix_token_id)]
        for req, lp in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self._eot])
        engine, reqs = self.engine, []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            n = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if n >= engine.cfg.max_seq_len:
                raise ValueError(f"max_gen_toks {n} must be below the engine's --max-seq-len "
                                 f"{engine.cfg.max_seq_len}")
            prompt = self.tok_encode(context)[-(engine.cfg.max_seq_len - n):] or [self._eot]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            options = GenerationOptions(max_tokens=n, temperature=temperature,
                                        stop=tuple(s for s in until if s))
            reqs.append(engine.add_request(prompt, options))
        while engine.has_work():
            engine.step()
        out = []
        for req, r in zip(requests, reqs):
            text = r.text
            for stop in req.args[1].get("until") or []:  # lm-eval cuts at the first stop string
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """(task names, directories to include): a spec that is a .yaml file names the task its
    `task:` key says, from its directory; anything else is a name in lm-eval's registry."""
    names, dirs = [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if spec.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise FileNotFoundError(f"--tasks: no task file {spec}")
            doc = yaml.safe_load(path.read_text()) or {}
            if not isinstance(doc, dict) or not doc.get("task"):
                raise ValueError(f"--tasks: {spec} has no `task:` name; an lm-eval task YAML needs one")
            names.append(str(doc["task"]))
            if str(path.absolute().parent) not in dirs:
                dirs.append(str(path.absolute().parent))
        else:
            names.append(spec)
    return names, dirs


def run_tasks(lm, specs: list[str], limit: float | None = None, num_fewshot: int | None = None,
              log_samples: bool = True, seed: int = 0, apply_chat_template: bool = False) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on the tasks; its results dict (with `samples`).
    `apply_chat_template`: prompts rendered as chats through the model's template."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names, dirs = task_names(specs)
    manager = TaskManager(include_path=dirs or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; give a task name from "
                         f"`lm_eval ls tasks` or a task YAML file")
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot, log_samples=log_samples, random_seed=seed,
                           apply_chat_template=apply_chat_template,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def save_results(results: dict, output_path: str) -> Path:
    """Writes results (and samples) in lm-eval's own layout, as `lm_eval --output_path` does;
    returns the directory written."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output_path)
    samples = results.pop("samples", None)
    tracker.general_config_tracker.model_name_sanitized = "lmsys"
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results.get("configs", {}):
        if samples and task in samples:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    if samples is not None:
        results["samples"] = samples
    return Path(output_path)


def task_metrics(results: dict) -> dict[str, float]:
    """Flat `task/metric` -> value of the numeric results (stderr left out)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out[f"{task}/{key.split(',')[0]}"] = float(value)
    return out
