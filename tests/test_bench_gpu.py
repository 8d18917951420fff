"""The GPU modes of `python -m lmsys.bench.train` on a CPU: argument checks, the MFU arithmetic
against a formula written out here, the torch peer skipped without CUDA (with its reason) and
run on the CPU on request (same first-step loss as lmsys)."""

import json
import pathlib

import pytest

import lmsys.bench.train
from lmsys.bench.peaks import mfu_figures
from lmsys.config import from_dict

TINY = ["--preset", "tiny", "--set", "model.n_layers=1", "--set", "model.n_kv_heads=2",
        "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0", "--repeats", "1"]


def test_mfu_arithmetic_matches_the_formula():
    m = from_dict({"model": {"preset": "1b", "n_layers": 2}}).model
    V, D, L, N, K, H, F, T = m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, 4096
    matmul = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + V * D  # tied: the head once
    full, causal = 6 * matmul + 12 * L * N * H * T, 6 * matmul + 6 * L * N * H * T
    tps = 30_000.0
    fig = mfu_figures(tps, m, T, 1, "NVIDIA H200", measured_peak=700e12)
    assert fig["datasheet_peak_tflops"] == pytest.approx(989.4)
    assert fig["mfu_datasheet"] == pytest.approx(tps * full / 989.4e12, rel=1e-12)
    assert fig["mfu_datasheet_causal"] == pytest.approx(tps * causal / 989.4e12, rel=1e-12)
    assert fig["mfu_measured"] == pytest.approx(tps * full / 700e12, rel=1e-12)
    assert fig["model_tflops"] == pytest.approx(tps * full / 1e12, rel=1e-12)
    two = mfu_figures(tps, m, T, 2, "cpu")  # unknown kind, no measurement: no MFU
    assert two["mfu_datasheet"] is None and two["mfu_measured"] is None
    assert two["model_tflops"] == pytest.approx(fig["model_tflops"] / 2)


@pytest.mark.parametrize("argv, message", [
    (["--peer-cpu"], "--peer-cpu and --torch-compile go with --peer torch"),
    (["--peer", "torch", "--mesh", "fsdp=-1"], "leave out --mesh"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--peer", "jax"], "invalid choice: 'jax'"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        lmsys.bench.train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_torch_peer_is_skipped_without_cuda_with_its_reason(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the peer runs")
    result = lmsys.bench.train.main(TINY + ["--peer", "torch"])
    assert "torch.cuda.is_available() is False" in result["peer_skipped"]
    out = capsys.readouterr().out
    assert "torch peer skipped: no CUDA device for torch" in out
    assert result["lmsys_tokens_per_s"] > 0 and "torch_tokens_per_s" not in result


def test_torch_peer_on_cpu_computes_lmsys_loss(tmp_path, capsys):
    pytest.importorskip("transformers")
    out_json, trace = tmp_path / "r.json", tmp_path / "trace"
    result = lmsys.bench.train.main(TINY + ["--peer", "torch", "--peer-cpu", "--measure-peak",
                                            "--peak-n", "128", "--json", str(out_json),
                                            "--profile", str(trace)])
    assert result["loss_rel_diff"] < 1e-5  # float32 on both sides: the same function
    assert result["torch_tokens_per_s"] > 0 and result["tokens_per_s_ratio"] > 0
    assert result["lmsys_measured_peak_tflops"] > 0 and result["lmsys_mfu_measured"] > 0
    assert json.loads(out_json.read_text())["torch_loss"] == pytest.approx(result["torch_loss"])
    assert any(p.name.endswith(".xplane.pb") for p in trace.rglob("*"))
    assert "lmsys/torch tokens/s ratio:" in capsys.readouterr().out


def test_decode_roofline_bytes_match_the_formula():
    from lmsys.bench.decode import roofline_bytes

    m = from_dict({"model": {"preset": "8b", "n_layers": 2}}).model  # untied: only the batch's embedding rows
    n_params = sum(x for x in (
        2 * m.vocab_size * m.d_model + m.d_model,  # embedding, head, final norm
        m.n_layers * (m.d_model * m.n_heads * m.head_dim * 2 + 2 * m.d_model * m.n_kv_heads * m.head_dim
                      + 3 * m.d_model * m.d_ff + 2 * m.d_model)))
    b = roofline_bytes(m, batch=64, context=2048.5)
    assert b["weight_bytes"] == 2 * (n_params - (m.vocab_size - 64) * m.d_model)
    assert b["kv_bytes"] == 2 * (2 * m.n_layers * m.n_kv_heads * m.head_dim * 2048.5 * 64)


def test_gpu_recipe_dry_run_writes_its_report(tmp_path):
    """recipes/gpu/mfu.py --smoke (two of its runs): the files the device tool brings back."""
    import subprocess
    import sys

    from tests.common import subprocess_env

    script = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "gpu" / "mfu.py"
    bad = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--only", "nope"],
                         capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and "--only: no run named nope" in bad.stderr
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--only",
                           "peaks,decode_1b"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mfu.json", "mfu.md", "runs.log"]
    results = json.loads((tmp_path / "mfu.json").read_text())
    assert results["peaks"]["result"]["matmul_tflops"] > 0
    assert 0 < results["decode_1b"]["result"]["fraction_of_roofline"]
    assert "of the roofline" in (tmp_path / "mfu.md").read_text()


def test_a_failing_torch_peer_leaves_lmsys_figures(monkeypatch, capsys):
    """Out of memory (or a torch.compile error) on the peer's side mid-run: the lmsys side is
    still timed and reported, and the failure is the peer's stated reason."""
    pytest.importorskip("transformers")
    from lmsys.bench.torch_peer import TorchPeer

    calls, step = [], TorchPeer.step

    def failing_step(self):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB\nmore")
        return step(self)

    monkeypatch.setattr(TorchPeer, "step", failing_step)
    result = lmsys.bench.train.main(TINY + ["--peer", "torch", "--peer-cpu"])
    assert result["peer_skipped"] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 16.00 GiB"
    assert result["lmsys_tokens_per_s"] > 0 and "torch_tokens_per_s" not in result
    assert "torch peer skipped: failed: RuntimeError" in capsys.readouterr().out


def test_a_run_killed_before_the_peer_keeps_lmsys_alone_figures(tmp_path, monkeypatch):
    """--peer torch writes lmsys's solo block to --json before building the peer; the GPU
    recipe's report shows it for a run whose process was killed (time limit) later."""
    import importlib.util

    pytest.importorskip("transformers")

    def killed(*_):
        raise SystemExit("killed while torch.compile ran")

    monkeypatch.setattr(lmsys.bench.train, "_torch_side", killed)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit):
        lmsys.bench.train.main(TINY + ["--peer", "torch", "--peer-cpu", "--json", str(out)])
    partial = json.loads(out.read_text())
    assert partial["lmsys_solo_tokens_per_s"] > 0 and "lmsys_tokens_per_s" not in partial

    path = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "gpu" / "mfu.py"
    spec = importlib.util.spec_from_file_location("mfu_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    run = {"model": {"preset": "tiny"}, "batch": 2, "seq": 16, "remat": "none", "loss_chunk": 0}
    achieved = partial["lmsys_solo_tokens_per_s"] * partial["flops_per_token"] / 1e12  # TFLOP/s
    peaks = {"run": {}, "status": "ok", "result": {"device": "cpu", "matmul_tflops": achieved / 0.5,
                                                   "datasheet_tflops": achieved / 0.25, "copy_gbs": 1.0}}
    text = recipe.report({"peaks": peaks, "train_1b_full": {"run": run, "status": "timed out after 260 s",
                                                            "seconds": 260.0, "result": partial}}, [])
    row = next(line for line in text.splitlines() if line.startswith("| train_1b_full"))
    assert "[lmsys alone, timed out after 260 s]" in row and f"{partial['lmsys_solo_tokens_per_s']:,.0f}" in row
    assert "| 25.0% | 50.0% |" in row  # MFU against the datasheet, then against the measured peak


def test_gpu_recipe_configs_are_valid_and_fit_by_the_plan(tmp_path, monkeypatch):
    """The GPU runs' arguments (never run here) parse, build valid configs that match the
    recipe's own record of them, and fit one H200 by `lmsys plan`."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "gpu" / "mfu.py"
    spec = importlib.util.spec_from_file_location("mfu_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    runs = recipe.runs(False, tmp_path)
    assert [r["name"] for r in runs] == ["peaks", "train_1b_full", "decode_1b", "train_8b_cut", "train_1b_selective"]
    results = {"peaks": {"run": runs[0], "result": {"device": "NVIDIA H200"}}}
    for r in runs:
        if r["argv"][0] != "lmsys.bench.train":
            continue
        cfg = lmsys.bench.train.build_config(lmsys.bench.train.parse_args(r["argv"][1:]))
        assert (cfg.batch_size, cfg.seq_len, cfg.remat, cfg.loss_chunk, cfg.dtype) == (
            r["batch"], r["seq"], r["remat"], r["loss_chunk"], "bfloat16")
        assert cfg.model.n_layers == r["model"].get("n_layers", cfg.model.n_layers)
        results[r["name"]] = {"run": r}
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # plan() sets it for the recipe's own process
    recipe.plan(results)
    for name in ("train_1b_full", "train_8b_cut", "train_1b_selective"):
        p = results[name]["plan"]
        # half the GPU at most: the torch peer shares it in the same process
        assert p["hardware"] == "NVIDIA H200 SXM" and p["fits"] and p["memory_bytes"] < 70e9, (name, p)
