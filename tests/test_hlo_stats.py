"""Reading collectives and HBM traffic out of optimised HLO text (hand-written modules)."""

from t5gemma_jax.train import hlo_stats

# A scanned loop of 6 trips whose body gathers a weight shard and reduce-scatters a gradient
# the way the TPU compiler writes it (an all-reduce inside an `all-reduce-scatter` fusion),
# plus one plain all-reduce of a scalar after the loop.
MODULE = """HloModule jit_train_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: bf16[64,16]) -> bf16[16,16] {
  %input.1 = bf16[64,16]{1,0} parameter(0)
  %all-reduce.9 = bf16[64,16]{1,0} all-reduce(%input.1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %slice.1 = bf16[16,16]{1,0} slice(%all-reduce.9), slice={[0:16], [0:16]}
}

%fused_update (param_0: f32[6,16,16], param_1: f32[1,16,16], param_2: s32[]) -> f32[6,16,16] {
  %param_0 = f32[6,16,16]{2,1,0} parameter(0)
  %param_1 = f32[1,16,16]{2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[6,16,16]{2,1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %zero, %zero)
}

%body (p: (s32[], bf16[16,16], f32[6,16,16])) -> (s32[], bf16[16,16], f32[6,16,16]) {
  %p = (s32[], bf16[16,16], f32[6,16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[16,16]{1,0} get-tuple-element(%p), index=1
  %acc = f32[6,16,16]{2,1,0} get-tuple-element(%p), index=2
  %all-gather-start.1 = (bf16[16,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(%w), replica_groups=[1,4]<=[4], dimensions={0}
  %all-gather-done.1 = bf16[64,16]{1,0} all-gather-done(%all-gather-start.1)
  %grad = bf16[64,16]{1,0:S(1)} copy(%all-gather-done.1)
  %rs = bf16[16,16]{1,0} fusion(%grad), kind=kOutput, calls=%all-reduce-scatter.1
  %row = f32[1,16,16]{2,1,0} broadcast(%i), dimensions={}
  %upd = f32[6,16,16]{2,1,0} fusion(%acc, %row, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[16,16], f32[6,16,16]) tuple(%next, %rs, %upd)
}

%cond (q: (s32[], bf16[16,16], f32[6,16,16])) -> pred[] {
  %q = (s32[], bf16[16,16], f32[6,16,16]) parameter(0)
  %k = s32[] get-tuple-element(%q), index=0
  %six = s32[] constant(6)
  ROOT %lt = pred[] compare(%k, %six), direction=LT
}

ENTRY %main (w0: bf16[16,16], acc0: f32[6,16,16], x: f32[]) -> f32[] {
  %w0 = bf16[16,16]{1,0} parameter(0)
  %acc0 = f32[6,16,16]{2,1,0} parameter(1)
  %x = f32[] parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,16], f32[6,16,16]) tuple(%zero, %w0, %acc0)
  %loop = (s32[], bf16[16,16], f32[6,16,16]) while(%init), condition=%cond, body=%body
  ROOT %all-reduce.2 = f32[] all-reduce(%x), replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0','axis_1'}, to_apply=%add
}
"""


def test_collectives_are_counted_per_trip_and_reduce_scatters_recognised():
  stats = hlo_stats.collectives(MODULE, num_devices=4)
  assert set(stats) == {"all-gather", "reduce-scatter", "all-reduce"}
  gather, scatter, reduce = stats["all-gather"], stats["reduce-scatter"], stats["all-reduce"]
  assert (gather["count"], gather["in_loop"]) == (6, 6)
  assert gather["bytes"] == 6 * 64 * 16 * 2  # the gathered result, every trip
  assert gather["traffic_bytes"] == 6 * 16 * 16 * 2 * 3  # (n - 1) shards received
  assert (scatter["count"], scatter["in_loop"], scatter["bytes"]) == (6, 6, 6 * 64 * 16 * 2)
  assert (reduce["count"], reduce["in_loop"], reduce["bytes"]) == (1, 0, 4)
  assert reduce["traffic_bytes"] == 2 * 4 * 3 / 4


def test_hbm_bytes_count_loop_trips_slices_and_skip_on_chip_buffers():
  per_trip = (
      16 * 16 * 2 + 64 * 16 * 2            # all-gather-start: its operand and gathered result
      + 64 * 16 * 2                        # copy: reads the gathered weight (result on chip)
      + 16 * 16 * 2                        # all-reduce-scatter fusion: operand on chip, result
      + 4 + 16 * 16 * 4                    # broadcast: the scalar in, the row out
      + 16 * 16 * 4 + 4 + 16 * 16 * 4      # fused update: row and index in, row written in
                                           # place (nothing read of the [6, 16, 16] buffer)
      + 3 * 4                              # add: two s32 operands and the result
      + 4 + 4 + 1)                         # the loop condition's compare, every trip
  after = 4 + 4                            # the final all-reduce
  assert hlo_stats.hbm_bytes(MODULE) == 6 * per_trip + after


def test_group_sizes_in_every_spelling():
  assert hlo_stats.group_size("replica_groups={{0,1},{2,3}}", 8) == 2
  assert hlo_stats.group_size("replica_groups=[2,4]<=[8]", 8) == 4
  assert hlo_stats.group_size("replica_groups=mesh['a'=2,'b'=4] {'b'}", 8) == 4
  assert hlo_stats.group_size("channel_id=3", 8) == 8
  assert hlo_stats.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0:S(1)})") == 12 + 16
  assert hlo_stats.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0:S(1)})", hbm_only=True) == 12
