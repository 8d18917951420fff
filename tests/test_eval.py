"""Evaluation (issue 18): held-out loss during training (falls; held-out documents never reach a
training batch; bitwise equal after a resume), `lmsys eval --tasks` through lm-eval equal to
lm-eval's own `hf` model on the exported weights (per request, 1e-4, and accuracy), lm-eval's
`local-completions` against `lmsys serve` equal to in-process, bits per byte equal to a hand
computation from transformers, and `--register` onto the registry. One tiny run trained once."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from common import write_corpus  # noqa: E402

from lmsys.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["def", "return", "import", "class", "self", "value", "None", "for", "in", "if"]
RUN_ARGS = ["steps=30", "model.vocab_size=300", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.head_dim=16", "model.d_ff=128", "seq_len=32", "batch_size=8",
            "checkpoint.async_save=false", "checkpoint.every=15", "log_every=5", "eval.every=10",
            "eval.batches=2", "eval.holdout=0.2", "eval.sample=def"]
ENGINE = ["--max-seq-len", "128", "--num-pages", "96", "--max-slots", "16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained 30 steps with a 20% held-out split, exported to HF, and task files."""
    tmp = tmp_path_factory.mktemp("eval")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    source = write_corpus(tmp / "corpus", n_docs=40)
    args = RUN_ARGS + [f"run_dir={tmp / 'run'}", f"data.source={source}", f"data.cache_dir={tmp / 'cache'}"]
    assert main(["train", str(ROOT / "recipes/configs/tiny.yaml"), *args, "--no-progress"]) == 0
    assert main(["convert", "to-hf", str(tmp / "run"), str(tmp / "hf")]) == 0
    return {"tmp": tmp, "run": tmp / "run", "hf": tmp / "hf", "source": source, "args": args,
            "tasks": _write_tasks(tmp / "tasks")}


def _write_tasks(directory: Path) -> list[str]:
    """A local multiple-choice task (one choice the corpus never has) and a rolling one."""
    rng = np.random.default_rng(1)
    directory.mkdir()
    with open(directory / "mc.jsonl", "w") as f:
        for i in range(12):
            choices = [" " + " ".join(rng.choice(WORDS, 2)) for _ in range(3)]
            choices.insert(i % 4, " zebra quux")
            f.write(json.dumps({"ctx": " ".join(rng.choice(WORDS, 5)), "choices": choices,
                                "label": int((i + 1) % 4)}) + "\n")
    with open(directory / "roll.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": "\n".join(" ".join(rng.choice(WORDS, 6)) for _ in range(3 + i))}) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        "task: lmsys_mc\n" + common.format(directory / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    (directory / "roll.yaml").write_text(
        "task: lmsys_roll\n" + common.format(directory / "roll.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return [str(directory / "mc.yaml"), str(directory / "roll.yaml")]


def _records(run_dir: Path, key: str) -> list[dict]:
    """The metrics.jsonl lines holding `key`, each with only the step and the eval_* values (a
    line also holds the step's training metrics, whose tokens/s is a timing)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
            for r in map(json.loads, lines) if key in r]


def _per_request(samples: dict) -> dict[str, list[float]]:
    """task -> every request's log-likelihood, in document order."""
    out = {}
    for task, docs in samples.items():
        docs = sorted(docs, key=lambda s: s["doc_id"])
        # (logprob, is_greedy) or a rolling logprob; the written samples hold them as strings
        out[task] = [float(r[0] if isinstance(r, (list, tuple)) else r)
                     for s in docs for resp in s["resps"] for r in [resp[0]]]
    return out


def _read_samples(directory: Path) -> dict[str, list[dict]]:
    out = {}
    for path in directory.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        out[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_heldout_loss_falls_and_heldout_documents_are_never_trained_on(run):
    from lmsys.config import load_config
    from lmsys.data import iter_documents
    from lmsys.data.heldout import is_heldout
    from lmsys.train.loop import load_data

    evals = _records(run["run"], "eval_loss")
    assert [r["step"] for r in evals] == [10, 20, 30]
    losses = [r["eval_loss"] for r in evals]
    assert losses[0] > losses[1] > losses[2], losses
    for r in evals:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert 0 < r["eval_bits_per_byte"] < r["eval_loss"]

    cfg = load_config(run["run"] / "config.yaml")
    docs = list(iter_documents(cfg.data.source))
    heldout = {i for i, d in enumerate(docs) if is_heldout(d, cfg.eval.holdout)}
    assert 0 < len(heldout) < len(docs)
    train_ids = [i for i in range(len(docs)) if i not in heldout]  # training stream doc j -> source id
    dataset = load_data(cfg)
    assert dataset.num_documents == len(train_ids)
    tok, starts = dataset.tokenizer, dataset._doc_starts
    seen = set()
    for g in range(cfg.steps * cfg.batch_size):  # every row of every batch the run trained on
        offsets = dataset.row_index(g) * cfg.seq_len + np.arange(cfg.seq_len + 1)
        seen |= {train_ids[j] for j in np.searchsorted(starts, offsets, side="right") - 1}
    assert seen and not seen & heldout
    for j in (0, len(train_ids) - 1):  # the mapping is real: stream document j is source document id
        end = starts[j + 1] if j + 1 < len(starts) else dataset.num_tokens
        assert tok.decode(list(dataset._tokens[starts[j]:end - 1])) == tok.decode(tok.encode(docs[train_ids[j]]).ids)


def test_heldout_eval_after_resume_is_bitwise_equal(run):
    from lmsys.config import load_config
    from lmsys.train.loop import train

    args = [a for a in run["args"] if not a.startswith("run_dir=")] + [f"run_dir={run['tmp'] / 'resumed'}"]
    cfg = load_config(ROOT / "recipes/configs/tiny.yaml", args)
    train(cfg, progress=False, stop_at=15)
    train(cfg, progress=False)
    assert _records(run["tmp"] / "resumed", "eval_loss") == _records(run["run"], "eval_loss")


def test_eval_tasks_match_lm_eval_hf_and_register(run, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    uri = f"sqlite:///{run['tmp'] / 'registry.db'}"
    assert main(["registry", "register", str(run["run"]), "--name", "tiny", "--uri", uri]) == 0
    os.environ["LMSYS_REGISTRY_URI"] = uri
    try:
        out = run["tmp"] / "results"
        assert main(["eval", "models:/tiny/1", "--tasks", ",".join(run["tasks"]), "--output", str(out),
                     "--register", "--uri", uri, *ENGINE]) == 0
        capsys.readouterr()
        assert main(["registry", "show", "tiny/1", "--uri", uri]) == 0
        shown = capsys.readouterr().out
    finally:
        del os.environ["LMSYS_REGISTRY_URI"]
    results = json.loads(next(out.rglob("results_*.json")).read_text())  # lm-eval's own layout
    ours = _per_request(_read_samples(out))
    hf = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={run['hf']},dtype=float32,device=cpu",
        tasks=["lmsys_mc", "lmsys_roll"], task_manager=TaskManager(include_path=[str(run["tmp"] / "tasks")]))
    theirs = _per_request(hf["samples"])
    for task in ("lmsys_mc", "lmsys_roll"):
        assert len(ours[task]) == len(theirs[task]) == (48 if task == "lmsys_mc" else 5)
        np.testing.assert_allclose(ours[task], theirs[task], rtol=0, atol=1e-4)
    acc = results["results"]["lmsys_mc"]["acc,none"]
    assert acc == hf["results"]["lmsys_mc"]["acc,none"]
    assert f"lmsys_mc/acc={acc:.4g}" in shown and "lmsys_roll/bits_per_byte=" in shown


def test_local_completions_against_serve_matches_in_process(run):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmsys.checkpoint import load_model
    from lmsys.eval.harness import LmsysLM, run_tasks
    from lmsys.serve.engine import Engine, EngineConfig
    from lmsys.serve.server import BackgroundServer, create_app

    m = load_model(run["run"])
    engine = lambda: Engine(m.params, m.config.model, m.tokenizer,  # noqa: E731
                            EngineConfig(max_slots=16, max_seq_len=128, num_pages=96),
                            eos_token_id=m.eos_token_id)
    in_process = run_tasks(LmsysLM(engine(), m.eos_token_id), run["tasks"])
    with BackgroundServer(create_app(engine(), "tiny", m.tokenizer)) as server:
        api = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={run['hf']},num_concurrent=4,max_retries=1,max_length=126",
            tasks=["lmsys_mc", "lmsys_roll"], task_manager=TaskManager(include_path=[str(run["tmp"] / "tasks")]))
    ours, theirs = _per_request(in_process["samples"]), _per_request(api["samples"])
    for task in ("lmsys_mc", "lmsys_roll"):
        np.testing.assert_allclose(theirs[task], ours[task], rtol=0, atol=1e-4)
    assert api["results"]["lmsys_mc"]["acc,none"] == in_process["results"]["lmsys_mc"]["acc,none"]


def test_generate_until_in_process_equals_local_completions_and_local_chat_completions(run):
    """A generation task, greedy: the in-process adapter's outputs equal lm-eval's
    `local-completions` against `lmsys serve`, and with the chat template applied in-process
    equal `local-chat-completions` (the server renders the chat)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmsys.checkpoint import load_model
    from lmsys.eval.harness import LmsysLM, run_tasks
    from lmsys.serve.engine import Engine, EngineConfig
    from lmsys.serve.server import BackgroundServer, create_app

    directory = run["tmp"] / "gen"
    directory.mkdir()
    rng = np.random.default_rng(2)
    with open(directory / "gen.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"ctx": " ".join(rng.choice(WORDS, 4)), "answer": "self"}) + "\n")
    (directory / "gen.yaml").write_text(
        f"task: lmsys_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{ctx}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"zebra\", \"quux\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    m = load_model(run["run"])
    engine = Engine(m.params, m.config.model, m.tokenizer, EngineConfig(max_slots=8, max_seq_len=128, num_pages=64),
                    eos_token_id=m.eos_token_id)
    lm = LmsysLM(engine, m.eos_token_id, m.chat_template)
    plain = run_tasks(lm, [str(directory / "gen.yaml")])["samples"]["lmsys_gen"]
    chat = run_tasks(lm, [str(directory / "gen.yaml")], apply_chat_template=True)["samples"]["lmsys_gen"]
    api = {}
    manager = TaskManager(include_path=[str(directory)])
    with BackgroundServer(create_app(engine, "tiny", m.tokenizer, chat_template=m.chat_template)) as server:
        for name, endpoint, extra in [("local-completions", "completions",
                                       f",tokenizer_backend=huggingface,tokenizer={run['hf']}"),
                                      ("local-chat-completions", "chat/completions", "")]:
            api[name] = lm_eval.simple_evaluate(
                model=name, model_args=f"model=tiny,base_url={server.url}/v1/{endpoint},num_concurrent=3,"
                                       f"max_retries=1{extra}",
                tasks=["lmsys_gen"], task_manager=manager,
                apply_chat_template=name == "local-chat-completions")["samples"]["lmsys_gen"]

    def outputs(samples):
        return [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]

    assert len(outputs(plain)) == 6 and any(outputs(plain)) and any(outputs(chat))
    assert "<|user|>" in chat[0]["arguments"][0][0] and "<|user|>" not in plain[0]["arguments"][0][0]
    assert outputs(api["local-completions"]) == outputs(plain)
    assert outputs(api["local-chat-completions"]) == outputs(chat)


def test_bits_per_byte_equals_a_hand_computation_with_transformers(run, capsys):
    text = "def value(self):\n    return None  # é → ok\nfor x in self:\n    import value\n"
    src = run["tmp"] / "text.txt"
    src.write_text(text)
    out = run["tmp"] / "text_eval"
    assert main(["eval", str(run["run"]), "--source", str(src), "--output", str(out), *ENGINE]) == 0
    got = json.loads((out / "text_metrics.json").read_text())

    tok = transformers.AutoTokenizer.from_pretrained(run["hf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([[tok.eos_token_id] + ids[:-1]])).logits[0]
    nll = -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert got["tokens"] == len(ids) and got["bytes"] == len(text.encode("utf-8"))
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), abs=1e-5)
    assert got["loss"] == pytest.approx(nll / len(ids), abs=1e-5)


def test_token_bytes_sum_to_the_text_and_bad_inputs_fail_clearly(run, capsys):
    from lmsys.config import ConfigError, load_config
    from lmsys.data import load_tokenizer
    from lmsys.data.heldout import eval_rows

    cfg = load_config(run["run"] / "config.yaml")
    tok = load_tokenizer(cfg.data.tokenizer, 300, source=cfg.data.source, cache_dir=cfg.data.cache_dir)
    docs = ["def é → value\n", "import 漢字 None\n", "class x:\n  pass\n"] * 4
    rows = eval_rows(docs, tok, 8, 100)
    n = rows.num_rows
    # every document token is a masked-in target exactly once (its bytes counted once)
    assert rows.target_bytes(0, n) == sum(len(d.encode()) for d in docs) - _tail_bytes(rows, docs, tok)

    assert main(["eval", str(run["run"])]) == 2
    assert "pass --source PATHS and/or --tasks TASKS" in capsys.readouterr().err
    assert main(["eval", str(run["run"]), "--source", str(run["source"]), "--register"]) == 2
    assert "is not one: pass models:/NAME@ALIAS" in capsys.readouterr().err
    assert main(["eval", str(run["run"]), "--tasks", "no_such_task_xyz", *ENGINE]) == 2
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err
    for overrides, match in [(["eval.every=5"], "set eval.holdout"),
                             (["eval.holdout=1.5"], "must be a fraction in"),
                             (["eval.holdout=0.1", "eval.source=x.txt"], "not both")]:
        with pytest.raises(ConfigError, match=match):
            load_config(ROOT / "recipes/configs/tiny.yaml", ["eval.holdout=0"] + overrides)


def _tail_bytes(rows, docs, tok) -> int:
    """The bytes of the document tokens past the last full row (not evaluated)."""
    stream_len = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    covered = rows.num_rows * rows.seq_len + 1
    return int(rows._bytes[covered:stream_len].sum()) if stream_len > covered else 0


def test_a_last_partial_eval_batch_counts_only_real_rows(run):
    """Fewer held-out rows than eval.batches x batch_size: the last batch is filled with rows
    whose loss mask is 0, so the metrics are those of the real rows, by hand from the model."""
    import jax

    from lmsys.checkpoint import load_run, open_model
    from lmsys.config import from_dict, to_dict
    from lmsys.eval.heldout import HeldoutEval, eval_metrics
    from lmsys.models import llama
    from lmsys.parallel import Rules, build_mesh
    from lmsys.train.step import Trainer, loss_sums

    saved, params, _ = load_run(run["run"])
    tree = to_dict(saved)
    tree.update(batch_size=16, eval={**tree["eval"], "batches": 4})
    cfg = from_dict(tree)
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
    evaluator = HeldoutEval(cfg, trainer, open_model(run["run"]).tokenizer())
    n = evaluator.rows.num_rows
    assert n % 16 and evaluator.batches == -(-n // 16)  # a partial last batch
    rows = [evaluator.rows.row(i) for i in range(n)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    logits, _ = llama.forward(jax.device_get(params), batch["tokens"], batch["positions"],
                              batch["segment_ids"], cfg=cfg.model)
    nll, tokens = (float(x) for x in loss_sums(logits, batch["targets"], batch["loss_mask"]))
    want = eval_metrics(nll, tokens, evaluator.rows.target_bytes(0, n))
    got = evaluator.evaluate(jax.device_put(params, trainer.param_shardings), 30)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
