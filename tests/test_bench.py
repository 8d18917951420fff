"""Tests for lmsys.bench: the train-step benchmark runs, and its baseline is really hand-written."""

import ast
import pathlib

import lmsys.bench.handwritten
import lmsys.bench.train


def test_train_bench_runs_and_first_step_losses_match(capsys):
    result = lmsys.bench.train.main([
        "--preset", "tiny", "--set", "model.n_layers=2", "--set", "model.n_kv_heads=2",
        "--batch-size", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "lmsys/handwritten step time ratio:" in out
    assert "first-step loss:" in out and "n/a" in out  # no known peak FLOP/s on CPU
    assert abs(result["lmsys_loss"] - result["handwritten_loss"]) <= 1e-5 * result["handwritten_loss"]
    assert result["param_max_abs_diff"] < 1e-5  # after one AdamW step at lr ~3e-5
    assert result["ratio"] > 0


def test_handwritten_step_does_not_import_lmsys():
    tree = ast.parse(pathlib.Path(lmsys.bench.handwritten.__file__).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules and not [m for m in modules if m.split(".")[0] == "lmsys"], modules
    source = ast.unparse(tree)
    assert "importlib" not in source and "__import__" not in source


def test_attention_bench_runs_and_checks_every_side(capsys):
    """A tiny CPU pass of `python -m lmsys.bench.attention`: every side is timed and checked
    against the fp32 reference; decode bytes and the copy bandwidth are measured."""
    import lmsys.bench.attention

    result = lmsys.bench.attention.main([
        "--seqs", "40", "--head-dims", "32", "--tokens", "40", "--d-model", "64", "--iters", "1",
        "--reps", "1", "--sets", "1", "--decode-lens", "48", "--decode-batch", "2",
        "--decode-heads", "4", "--decode-kv-heads", "2", "--copy-mib", "1"])
    flash = {r["impl"]: r for r in result["flash"]}
    assert set(flash) == {"lmsys triton", "xla"}  # cuDNN and jax's kernels: GPU only
    for r in flash.values():
        assert r["tflops_fwd"] > 0 and r["tflops_fwd_bwd"] > 0
        assert r["err_out"] < 1e-2 and r["err_grad"] < 1e-2  # bf16 inputs vs fp32 reference
    decode = {r["impl"]: r for r in result["decode"]}
    assert set(decode) == {"lmsys pallas", "xla gather"}
    assert all(r["err"] < 1e-2 and r["gbs"] > 0 for r in decode.values())
    assert result["copy_gbs"] > 0
    assert "lmsys pallas" in capsys.readouterr().out


def test_serve_bench_reuse_workloads_run_side_by_side(capsys):
    """A tiny CPU pass of `python -m lmsys.bench.serve --workload shared-prefix|copy`: the cached
    side prefills the shared prompt once and both sides give the same greedy tokens; ngram and
    draft-model speculation accept drafts and give the tokens of plain decoding."""
    import lmsys.bench.serve

    small = ["--preset", "tiny", "--set", "model.n_layers=1", "--set", "model.vocab_size=512",
             "--max-slots", "1", "--page-size", "8", "--prefill-chunk", "16", "--max-tokens", "6"]
    a = lmsys.bench.serve.main(small + ["--workload", "shared-prefix", "--requests", "3", "--prefix-len", "40",
                                        "--prompt-len", "3"])
    assert a["prefix_cache"]["prefilled"] == 42 + 2 * 2 and a["no_prefix_cache"]["prefilled"] == 3 * 42
    assert a["prefix_cache"]["outputs"] == a["no_prefix_cache"]["outputs"]
    b = lmsys.bench.serve.main(small + ["--workload", "copy", "--prompt-len", "12"])
    for batch in (1, 8):
        for spec in ("ngram", "draft"):
            assert b[(spec, batch)]["outputs"] == b[("none", batch)]["outputs"]
            assert b[(spec, batch)]["acceptance"] > 0 and b[(spec, batch)]["tokens_per_step"] > 1
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "ngram/plain throughput" in out
