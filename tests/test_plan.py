"""`lmsys plan`: the analytical model against compiled steps (CPU here; the real TPU compiler
ahead of time when libtpu is installed), the mesh search, the CLI and its errors."""

import importlib.util
import re

import jax
import pytest

from lmsys.cli import main
from lmsys.config import from_dict, load_config
from lmsys.plan import planner as plan
from lmsys.plan.hlo import parse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="no libtpu: the TPU ahead-of-time compile tests "
                                                         "need the `tpu` extra (pip install -e '.[tpu]')")
RECIPE = "recipes/configs/llama3-8b.yaml"


def big(preset: str, chips: int, **over):
    """MaxText's comparison setup: FSDP over all chips, 4 rows x 4096 tokens per chip, bf16
    compute, full remat, flash attention."""
    tree = {"model": {"preset": preset, "attention_impl": "auto"}, "mesh": {"fsdp": -1},
            "batch_size": 4 * chips, "seq_len": 4096, "remat": "full", "dtype": "bfloat16", "loss_chunk": 256}
    return from_dict({**tree, **over})


def test_analytical_arguments_match_the_cpu_compile():
    """The step's inputs exactly (the temporaries are the TPU compiler's to match: below)."""
    cfg = from_dict({"model": {"preset": "small"}, "mesh": {"fsdp": 8}, "batch_size": 16, "seq_len": 256,
                     "remat": "full", "loss_chunk": 64})
    p = plan.analyze(cfg, 8, "h100")
    compiled, sizes = plan.aot_compile(cfg, jax.devices())
    got = plan.compiled_figures(compiled, 8)
    assert sizes == p.sizes
    assert p.arguments == pytest.approx(got["arguments"], rel=0.02)


def test_search_llama3_8b_on_8_h100s():
    cfg = load_config(RECIPE)
    plans = plan.search(cfg, 8, "h100")
    assert plans and all(p.fits for p in plans)
    assert [p.step_time for p in plans] == sorted(p.step_time for p in plans)
    best = plans[0]
    assert best.devices == 8 and best.total_memory <= plan.USABLE * 80e9
    # what does not fit is left out: plain data parallelism holds 8B x 16 bytes per device
    assert all(p.sizes["data"] < 8 for p in plans)
    text = plan.render_search(plans, 3)
    assert text.splitlines()[2].split()[1:3] == plan.mesh_text(best.sizes).split()[:2]
    assert "why: compute-bound" in text or "why: communication-bound" in text


def test_new_family_presets_plan():
    """gemma3-27b (27.0B params) and qwen3-30b-a3b (30.5B, 128 experts top-8): their windowed
    layers and routed experts show in the FLOPs, and the search over an MoE also tries expert
    parallelism."""
    from lmsys.models import llama

    gemma, qwen = big("gemma3-27b", 64), big("qwen3-30b-a3b", 16)
    assert round(llama.count_params(gemma.model) / 1e9, 2) == 27.01
    assert round(llama.count_params(qwen.model) / 1e9, 2) == 30.53
    full = from_dict({"model": {"preset": "gemma3-27b", "sliding_window": 0, "global_every": 0,
                                "rope_local_theta": 0.0}})
    windowed = plan.analyze(gemma, 64, "h100")
    # 52 of 62 layers see 1,024 of the 4,096 tokens
    attention = 12 * 32 * 128 * (10 * 4096 + 52 * 1024)
    assert llama.flops_per_token(full.model, 4096) - llama.flops_per_token(gemma.model, 4096) == \
        12 * 32 * 128 * 62 * 4096 - attention
    assert windowed.fits
    plans = plan.search(qwen, 16, "h100")
    assert plans and {p.sizes["expert"] for p in plans} >= {1, 2, 4}


def test_pipeline_bubble_counts_as_idle_compute():
    """With stages, the step's FLOPs are spread over the busy share of the ticks, 1 - bubble."""
    flat = plan.analyze(load_config(RECIPE, ["mesh.fsdp=8"]), 8, "h100")
    staged = plan.analyze(load_config(RECIPE, ["mesh.fsdp=4", "mesh.stage=2",
                                               "pipeline.microbatches=4"]), 8, "h100")
    bubble = 1 / 5  # (p-1)/(m+p-1), p=2, m=4
    assert staged.flops == pytest.approx(flat.flops / (1 - bubble))
    assert "pipeline bubble 20% counted as idle compute" in staged.notes


def test_nothing_fits_says_so():
    cfg = load_config(RECIPE, ["model.preset=70b"])
    assert plan.search(cfg, 8, "h100") == []  # 70B x 12 bytes of state / 8 > 72 GB
    assert plan.render_search([], 5).startswith("no mesh and remat policy fits")


def test_cli_plan_table_and_errors(capsys):
    assert main(["plan", RECIPE, "--devices", "8", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "fits in 90% of 80 GB" in out and "fsdp gather+scatter" in out and "MFU" in out
    assert main(["plan", RECIPE, "model.preset=70b", "mesh.fsdp=-1", "--devices", "8"]) == 3  # does not fit
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", RECIPE, "--devices", "6"]) == 2  # 32 rows over 6 fsdp devices
    assert "(32 sequences) must split over mesh data x fsdp = 6 devices" in capsys.readouterr().err
    assert main(["plan", RECIPE, "--topology", "v5p:4x4x4", "--devices", "64"]) == 2
    assert "--devices comes from --topology" in capsys.readouterr().err
    assert main(["plan", RECIPE, "--topology", "nonsense:9"]) == 2
    assert "no datasheet figures for 'nonsense'" in capsys.readouterr().err
    with pytest.raises(plan.PlanError, match="unknown hardware 'tpu9'"):
        plan.analyze(load_config(RECIPE), 8, "tpu9")


@needs_libtpu
def test_bad_topology_is_a_clear_error():
    with pytest.raises(plan.PlanError, match="cannot get TPU topology 'v5p:3x3x3'"):
        plan.tpu_devices("v5p:3x3x3")


def _compare(p: plan.Plan):
    got = p.compiled
    assert got["unknown_trip_counts"] == 0
    assert p.arguments == pytest.approx(got["arguments"], rel=0.02)
    assert p.total_memory == pytest.approx(got["total"], rel=0.2), (p.memory, got)
    # Collective bytes of every kind, each op's result bytes (the measure of the MaxText figures
    # in BENCHMARKS.md). On v5p:4x4x4 and 8x8x4 the TPU compiler lowers the fsdp all-gathers as
    # all-reduces of zero-padded shards: equal result bytes, twice the ring's wire bytes.
    ratio = sum(got["collective_result"].values()) / sum(p.collectives.values())
    assert 1.0 <= ratio <= 1.2, (got["collective_result"], p.collectives)


@needs_libtpu
def test_tpu_aot_8b_on_v5p_4x4x4_matches_the_analytical_model():
    _compare(plan.plan_topology(big("8b", 64), "v5p:4x4x4"))


@needs_libtpu
@pytest.mark.slow
def test_tpu_aot_70b_on_v5p_8x8x4_matches_the_analytical_model():
    _compare(plan.plan_topology(big("70b", 256), "v5p:8x8x4"))


@needs_libtpu
def test_search_on_a_tpu_topology_is_confirmed_by_the_compiler(capsys):
    cfg = load_config(RECIPE, ["batch_size=16"])
    plans = plan.search_topology(cfg, "v5p:2x2x2")
    best = plans[0]
    assert best.compiled and best.compiled["total"] <= plan.USABLE * 95e9 and best.devices == 8
    assert best.arguments == pytest.approx(best.compiled["arguments"], rel=0.02)
    assert all(p.compiled is None for p in plans[1:])  # the compiler confirmed the first it tried
    text = plan.render_search(plans, 2)
    assert f"confirmed by the TPU compiler: plan 1 needs {best.compiled['total'] / 1e9:.2f} GB" in text


def test_search_on_a_topology_drops_what_the_compiler_refuses(monkeypatch):
    """The compiler's word over the analytical model's: plans whose compiled memory does not fit
    are dropped, and when none of the best `confirm` fits the error names them."""
    compiled = iter([130e9, 80e9, 120e9, 140e9])  # GB per device, as the compiler would say
    monkeypatch.setattr(plan, "tpu_devices", lambda topology: list(range(8)))
    monkeypatch.setattr(plan, "aot_compile", lambda cfg, devices: (None, None))
    monkeypatch.setattr(plan, "compiled_figures", lambda c, n: {"total": next(compiled)})
    cfg = load_config(RECIPE, ["batch_size=16"])
    analytical = plan.search(cfg, 8, "v5p")
    plans = plan.search_topology(cfg, "v5p:2x2x2")
    assert plans[0].compiled == {"total": 80e9} and plans[0].sizes == analytical[1].sizes
    assert len(plans) == len(analytical) - 1
    with pytest.raises(plan.PlanError, match=r"the TPU compiler needs more than 90% of 95 GB per device "
                                             r"for each of the best 2 plans \(fsdp 8 remat selective: 120.00 GB"):
        plan.search_topology(cfg, "v5p:2x2x2", confirm=2)


@needs_libtpu
def test_ring_attention_passes_kv_asynchronously_on_tpu():
    """The TPU compiler overlaps each ring step's K/V collective-permute with the attention
    compute: every permute in the loops is a -start/-done pair with compute (fusions, the
    flash kernel's custom calls) scheduled between them."""
    cfg = from_dict({"model": {"preset": "tiny"}, "mesh": {"sequence": 4, "fsdp": 1}, "batch_size": 2,
                     "seq_len": 512})
    compiled, _ = plan.aot_compile(cfg, plan.tpu_devices("v5p:2x2x1"))
    module = parse(compiled.as_text())
    pairs = 0
    for name, instructions in module.computations.items():
        if name == module.entry:  # outside the layer and ring loops (the batch's reordering)
            continue
        names = [i.name for i in instructions]
        for k, ins in enumerate(instructions):
            if ins.op != "collective-permute-start":
                continue
            done = next(j for j in range(k, len(instructions))
                        if instructions[j].op == "collective-permute-done"
                        and instructions[j].operand_name(0) == ins.name)
            between = instructions[k + 1:done]
            assert any(re.match(r"fusion|convolution|dot|custom-call", i.op) for i in between), names[k:done + 1]
            pairs += 1
    assert pairs >= 2  # K and V
    assert " collective-permute(" not in compiled.as_text()  # no synchronous one
