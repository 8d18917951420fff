"""lmsys.bench.comm: the HLO collective parser on a compiled data-parallel step (its all-reduce
bytes are the gradient bytes) and on hand-written HLO (loop trip counts, async pairs, replica
group forms), and the analytical minimum of lmsys.parallel.analysis."""

import pytest
from common import tiny_config

from lmsys.bench.comm import collective_bytes, group_size, measure
from lmsys.parallel import analysis

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

