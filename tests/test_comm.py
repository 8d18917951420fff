"""lmsys.plan.hlo and lmsys.bench.comm: the HLO collective parser on a compiled
data-parallel step (its all-reduce bytes are the gradient bytes) and on hand-written HLO (loop
trip counts, async pairs, replica group forms), the analytical minimum of
lmsys.plan.analysis, and the loop-aware matmul FLOP count (scans, nested scans, the train
step, convolutions against XLA's own count, the TPU and GPU dialects)."""

import jax
import jax.numpy as jnp
import pytest
from common import tiny_config

from lmsys.bench.comm import compile_step, measure
from lmsys.config import from_dict
from lmsys.models.llama import flops_per_token
from lmsys.plan import analysis
from lmsys.plan.hlo import collective_bytes, group_size, matmul_flops

# untied: with tied embeddings the embedding's two gradient parts are all-reduced separately
UNTIED = {"tie_embeddings": False}


def test_data_parallel_all_reduce_is_the_gradient_bytes():
    cfg = tiny_config({"data": 8, "fsdp": 1}, model=UNTIED)
    got, sizes = measure(cfg)
    params = sum(analysis.param_bytes_per_device(cfg.model, sizes).values())
    # all float32 gradients, once, plus a few scalars (loss sums, token count)
    assert params <= got.result["all-reduce"] <= params * 1.001, (got.result, params)
    assert got.total_result == got.result["all-reduce"], got.result
    assert got.wire["all-reduce"] == pytest.approx(2 * 7 / 8 * got.result["all-reduce"])
    assert got.unknown_trip_counts == 0
    minimum = analysis.collective_bytes_min(cfg, sizes)
    assert minimum == {"grad all-reduce": pytest.approx(2 * 7 / 8 * params)}
    assert got.total_wire / sum(minimum.values()) == pytest.approx(1.0, rel=1e-3)


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %ag-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%x), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %ag = f32[16,8]{1,0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %ar = (f32[4,8]{1,0}, bf16[10]{0}) all-reduce(%x, %y), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %w = (s32[], f32[4,8]) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[1,8]{1,0} reduce-scatter(%x), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}, to_apply=%add
  ROOT %r = f32[4,8]{1,0} copy(%x)
}
"""


def test_parser_counts_loop_trips_async_pairs_and_groups():
    got = collective_bytes(HLO, 8)
    assert got.result["all-reduce"] == 4 * 8 * 4 + 10 * 2
    assert got.wire["all-reduce"] == pytest.approx((4 * 8 * 4 + 10 * 2) * 2 * 7 / 8)
    assert got.count["collective-permute"] == 3 and got.result["collective-permute"] == 3 * 128
    assert got.count["all-gather"] == 3 and got.result["all-gather"] == 3 * 16 * 8 * 4  # -done only
    assert got.wire["all-gather"] == pytest.approx(3 * 512 * 3 / 4)  # groups of 4
    assert got.result["reduce-scatter"] == 32 and got.wire["reduce-scatter"] == 32 * 3  # {'axis_1'} = 4
    assert got.unknown_trip_counts == 0
    no_annotation = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    assert collective_bytes(no_annotation, 8).unknown_trip_counts == 1
    assert collective_bytes(no_annotation, 8).count["collective-permute"] == 1
    # the TPU compiler's HLO: no annotation, a `counter < constant(N)` condition
    counted = no_annotation.replace("  ROOT %c = pred[] constant(true)\n", (
        "  %p = (s32[], f32[4,8]) parameter(0)\n  %n = s32[]{:T(128)} constant(5)\n"
        "  %i = s32[] get-tuple-element(%p), index=0\n"
        "  ROOT %c = pred[] compare(%i, %n), direction=LT\n"))
    got = collective_bytes(counted, 8)
    assert got.unknown_trip_counts == 0 and got.count["collective-permute"] == 5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="replica groups"):
        group_size("channel_id=1, replica_groups=??", 8)
    with pytest.raises(ValueError, match="no ENTRY"):
        collective_bytes("%f (a: f32[]) -> f32[] {\n}\n", 8)
    with pytest.raises(ValueError, match="must split over the mesh"):
        analysis.collective_bytes_min(tiny_config({"data": 8, "fsdp": 1}, batch_size=4), {"data": 8})



def _compile(f, *shapes):
    return jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def test_matmul_flops_counts_every_scan_iteration():
    L = 5

    def f(x, ws):  # L matmuls [64,128] x [128,256], one per scan step
        return jax.lax.scan(lambda acc, w: (acc + x @ w, None), jnp.zeros((64, 256)), ws)[0]

    compiled = _compile(f, (64, 128), (L, 128, 256))
    got = matmul_flops(compiled.as_text())
    assert got.flops == 2 * 64 * 128 * 256 * L and got.count == L
    assert got.unknown_trip_counts == 0 and got.opaque_custom_calls == {}
    # why this exists: XLA's cost analysis (jax 0.10.2, CPU) counts the loop body once (the
    # dot plus a few elementwise FLOPs of the accumulation)
    assert compiled.cost_analysis()["flops"] == pytest.approx(got.flops / L, rel=0.01)


def test_matmul_flops_multiplies_nested_scans():
    def f(x, ws):  # ws [3, 4, 128, 128]: 3 outer steps of 4 inner matmuls each
        inner = lambda h, w: (jnp.tanh(h @ w), None)
        return jax.lax.scan(lambda h, wo: (jax.lax.scan(inner, h, wo)[0], None), x, ws)[0]

    compiled = _compile(f, (64, 128), (3, 4, 128, 128))
    got = matmul_flops(compiled.as_text())
    assert got.flops == 2 * 64 * 128 * 128 * 12 and got.count == 12
    assert compiled.cost_analysis()["flops"] == pytest.approx(got.flops / 12, rel=0.01)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_matmul_flops_of_the_train_step_is_the_model_count(remat):
    """The `tiny` preset's train step on 1 device. flops_per_token = 6 x (matmul parameters,
    the output projection included) + 12 L N H T = 3 x the forward (every matmul of the
    forward has two of the same size in the backward: the input and the weight gradient;
    attention's scores and values likewise), so without remat the step's dots are exactly
    flops_per_token x tokens. With remat=full the backward of each scanned layer recomputes that
    layer's forward, except w_down, whose output only feeds the residual add (jax removes
    it from the recompute): + 2 x (layer matmul params - L x d_ff x d_model) + 4 L N H T per
    token. Both were measured to be exact on jax 0.10.2 (the output projection is outside the
    layers and never recomputed)."""
    cfg = from_dict({"model": {"preset": "tiny"}, "mesh": {}, "batch_size": 2, "seq_len": 32, "remat": remat})
    hlo_text, _ = compile_step(cfg, jax.devices()[:1])
    got = matmul_flops(hlo_text)
    m, tokens = cfg.model, cfg.batch_size * cfg.seq_len
    expected = flops_per_token(m, cfg.seq_len) * tokens
    if remat == "full":
        D, F, N, K, H, L = m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.head_dim, m.n_layers
        layer_params = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
        expected += (2 * (layer_params - L * F * D) + 4 * L * N * H * cfg.seq_len) * tokens
    assert got.flops == pytest.approx(expected, rel=1e-9), (got.flops / expected, remat)
    assert got.unknown_trip_counts == 0 and got.opaque_custom_calls == {}


def test_convolution_flops_match_xla_outside_loops():
    """Strides, padding, input and kernel dilation, feature groups: the same count as XLA's
    cost analysis (which is right for a program without loops)."""
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 1), ((1, 2), (0, 1)), lhs_dilation=(1, 2),
                                            rhs_dilation=(2, 1), feature_group_count=2)

    compiled = _compile(conv, (2, 6, 11, 9), (8, 3, 3, 2))
    assert "convolution(" in compiled.as_text()
    got = matmul_flops(compiled.as_text())
    assert got.count == 1 and got.flops == compiled.cost_analysis()["flops"] == 21216


# The TPU compiler's dialect (tiled layouts, untyped operands, `/*index=*/` comments, dots as
# convolutions in fusions, a `counter < constant(N)` loop condition) and the GPU one (typed
# operands, cuBLAS gemm custom calls, async wrappers that print `calls=` on both halves).
DIALECTS_HLO = """HloModule t

%fused_dot (param_0: f32[2,256,384,1], param_1: bf16[384,8,48,1]) -> f32[2,256,8,48] {
  %param_0 = f32[2,256,384,1]{2,1,3,0:T(8,128)} parameter(0)
  %param_1 = bf16[384,8,48,1]{0,2,1,3:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.82 = f32[2,256,8,48]{1,3,2,0:T(8,128)} convolution(%param_0, %param_1), window={size=1x8 pad=0_0x7_7 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f
}

%body (p: (s32[], f32[2,256,384,1], bf16[384,8,48,1])) -> (s32[], f32[2,256,384,1], bf16[384,8,48,1]) {
  %p = (s32[]{:T(128)}, f32[2,256,384,1]{2,1,3,0:T(8,128)}, bf16[384,8,48,1]{0,2,1,3:T(8,128)(2,1)}) parameter(0)
  %a = f32[2,256,384,1]{2,1,3,0:T(8,128)} get-tuple-element(%p), index=1
  %b = bf16[384,8,48,1]{0,2,1,3:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %fusion.1 = f32[2,256,8,48]{1,3,2,0:T(8,128)} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  %k = f32[8]{0:T(256)} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {}}
  %buf = f32[8]{0:T(256)} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %t = (s32[]{:T(128)}, f32[2,256,384,1]{2,1,3,0:T(8,128)}, /*index=2*/bf16[384,8,48,1]{0,2,1,3:T(8,128)(2,1)}) tuple(%i, %a, %b)
}

%cond (p: (s32[], f32[2,256,384,1], bf16[384,8,48,1])) -> pred[] {
  %n = s32[]{:T(128)} constant(3)
  %p = (s32[]{:T(128)}, f32[2,256,384,1]{2,1,3,0:T(8,128)}, bf16[384,8,48,1]{0,2,1,3:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%wrapped (q: f32[4,8]) -> f32[4,16] {
  %q = f32[4,8]{1,0} parameter(0)
  %z = f32[] constant(1)
  %w2 = f32[8,16]{1,0} broadcast(f32[] %z), dimensions={}
  ROOT %d2 = f32[4,16]{1,0} dot(f32[4,8]{1,0} %q, f32[8,16]{1,0} %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[4,8], w: f32[8,16], a: f32[16,32], b: f32[32,16], init: (s32[], f32[2,256,384,1], bf16[384,8,48,1])) -> f32[4,16] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %a = f32[16,32]{1,0} parameter(2)
  %b = f32[32,16]{1,0} parameter(3)
  %init = (s32[], f32[2,256,384,1], bf16[384,8,48,1]) parameter(4)
  %d = f32[4,16]{1,0} dot(f32[4,8]{1,0} %x, f32[8,16]{1,0} %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = (f32[16,16]{1,0}, s8[1028]{0}) custom-call(f32[16,32]{1,0} %a, f32[32,16]{1,0} %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %as = ((f32[4,8]{1,0}), f32[4,16]{1,0}, u32[]) async-start(f32[4,8]{1,0} %x), calls=%wrapped
  %ad = f32[4,16]{1,0} async-done(((f32[4,8]{1,0}), f32[4,16]{1,0}, u32[]) %as), calls=%wrapped
  %loop = (s32[], f32[2,256,384,1], bf16[384,8,48,1]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4,16]{1,0} add(%d, %ad)
}
"""


def test_matmul_flops_reads_the_tpu_and_gpu_dialects():
    got = matmul_flops(DIALECTS_HLO)
    # the convolution is the dot [512,384] x [384,384] (heads as a padded window of 8: one
    # real input element per output position), 3 loop trips
    conv = 2 * (2 * 256) * 384 * (8 * 48)
    assert got.flops == 2 * 4 * 16 * 8 + 2 * 16 * 16 * 32 + 2 * 4 * 16 * 8 + 3 * conv
    assert got.count == 1 + 1 + 1 + 3  # dot, gemm, the async-wrapped dot once, 3 convolutions
    assert got.unknown_trip_counts == 0
    assert got.opaque_custom_calls == {"tpu_custom_call": 3}  # AllocateBuffer computes nothing
    undefined = DIALECTS_HLO.replace("dot(f32[4,8]{1,0} %x, f32[8,16]{1,0} %w)", "dot(%x9, %w)")
    with pytest.raises(ValueError, match="defines no instruction 'x9'"):
        matmul_flops(undefined)


STEP2 = """HloModule m

%body (p: (u32[], f32[4])) -> (u32[], f32[4]) {
  %p = (u32[], f32[4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  %cp = f32[4]{0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (u32[], f32[4]) tuple(%next, %cp)
}

%cond (p: (u32[], f32[4])) -> pred[] {
  %p = (u32[], f32[4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %n = u32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4]) -> (u32[], f32[4]) {
  %x = f32[4]{0} parameter(0)
  %zero = u32[] constant(0)
  %init = (u32[], f32[4]) tuple(%zero, %x)
  ROOT %w = (u32[], f32[4]) while(%init), condition=%cond, body=%body
}
"""


def test_trip_count_follows_the_counter_step():
    """The TPU compiler's windowed-matmul loops (all-gathers and reduce-scatters decomposed
    into collective-permutes) count 0, 2, ..., 14 against 16: 8 iterations, not 16."""
    got = collective_bytes(STEP2, 2)
    assert got.count["collective-permute"] == 8
    assert got.result["collective-permute"] == 8 * 16
    assert collective_bytes(STEP2.replace("constant(2)", "constant(1)"), 2).count["collective-permute"] == 16
    assert collective_bytes(STEP2.replace("%zero = u32[] constant(0)", "%zero = u32[] constant(4)"),
                            2).count["collective-permute"] == 6
    # the `--xla_dump_to` files write tuple elements inline (`%p#0`), with no get-tuple-element
    inline = STEP2.replace("  %i = u32[] get-tuple-element(%p), index=0\n", "").replace("%i,", "%p#0,")
    inline = inline.replace("  %x = f32[4]{0} get-tuple-element(%p), index=1\n", "").replace("(%x)", "(%p#1)")
    assert "get-tuple-element" not in inline
    assert collective_bytes(inline, 2).count["collective-permute"] == 8
