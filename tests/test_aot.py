"""Programs compiled ahead of time for TPU slices that libtpu describes (no TPU is touched):
the collectives a decoding step and its prefill hold on data, fsdp and tensor meshes, for
each model family and the greedy, beam, speculative and routed loops; the estimator on a
sharded matmul, the fit report and the bad topology names."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from l2s_jax import aot, build, sharding
from l2s_jax.collab import Routed, Speculative
from l2s_jax.collab.combine import Router
from l2s_jax.decoding import Beam, Sample, lower
from l2s_jax.models import init_boxed, layers

pytest.importorskip("libtpu", reason="the TPU compile tests need libtpu (the test extra)")

B, PROMPT, N = 16, 16, 8
# Tiny shapes of each family: 2 layers, 4 heads (the tensor axis splits them), bf16.
FAMILIES = {
  "t5": ("t5-small", dict(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, d_ff=128,
                          num_heads=4, vocab_size=512)),
  "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=512,
                        n_positions=64)),
  "llama": ("qwen2-0.5b", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                               vocab_size=512, max_position_embeddings=64)),
}  # fmt: skip


def tiny(family):
  preset, changes = FAMILIES[family]
  cls, cfg = build.preset(preset)
  fields = {f.name for f in dataclasses.fields(cfg)}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in fields})
  return build.with_compute_dtype(cls(cfg), "bfloat16")


def abstract_params(model, mesh, rules):
  boxed = jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0)))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
    nn.unbox(boxed),
    shardings,
  )


RULES = {"data": "replicated", "fsdp": "fsdp_tensor", "tensor": "fsdp_tensor"}


def method(name, model, params):
  """(spec, models, params) of a method over the tiny model (twice for the collaborative
  ones: the loops are what is checked, not the pairing)."""
  if name == "greedy":
    return Sample(), model, params
  if name == "beam":
    return Beam(num_beams=2), model, params
  pair = (model, model), (params, params)
  if name == "speculative":
    return (Speculative(gamma=3), *pair)
  return (Routed(router=Router("margin", 0.3)), *pair)


def compile_decode(family, mesh_axis, topology="v5e:2x2", new_tokens=N, spec="greedy", rows=B):
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh({mesh_axis: len(devices)}, devices)
  model = tiny(family)
  params = abstract_params(model, mesh, RULES[mesh_axis])
  ids = jax.ShapeDtypeStruct((rows, PROMPT), jnp.int32)
  spec, models, params = method(spec, model, params)
  lowered = lower(spec, models, params, ids, max_new_tokens=new_tokens, eos_id=1, mesh=mesh)
  return model, params, mesh, lowered.compile()


def hidden_size(model):
  c = model.config
  return getattr(c, "d_model", None) or getattr(c, "n_embd", None) or c.hidden_size


def cache_bytes(model) -> int:
  """Bytes of one layer's whole key (or value) cache [B, K, S, H] as the decoder sizes it."""
  slots = model.cache_length(PROMPT, N)
  v = jax.eval_shape(lambda: model.init_cache(B, slots))["layers"][0]["v"]
  return int(np.prod(v.shape)) * v.dtype.itemsize


def step_and_prefill(compiled):
  found = aot.collectives(compiled.as_text())
  return found["loops"][-1], found["outside_loops"]


FAMILY_NAMES = ["t5", "gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("spec", ["greedy", "speculative", "routed"])
def test_a_data_parallel_decoder_holds_only_its_stop_check(family, spec):
  """Params replicated, rows split over 4 chips: neither a step nor the prefill holds a
  collective but the all-rows-done check (an all-reduce of a flag or a count; the routed
  loop's catch-up of the large model asks once more). Before the fix
  the prefill all-gathered each layer's first key/value rows (its cache write)."""
  _, _, _, compiled = compile_decode(family, "data", spec=spec)
  step, outside = step_and_prefill(compiled)
  assert set(step.count) <= {"all-reduce"} and set(outside.count) == {"all-reduce"}
  assert step.count["all-reduce"] <= 2 and outside.count["all-reduce"] <= 2, (step, outside)
  # Flags and counts (a padded [1, 1, 128] u32 vector at most); an activation is 2 KiB.
  flags = step.shapes["all-reduce"] + outside.shapes["all-reduce"]
  assert all(aot.shape_bytes(x) <= 1024 for x in flags), flags


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("spec", ["greedy", "speculative", "routed"])
def test_a_tensor_parallel_decode_step_holds_only_all_reduces(family, spec):
  """Heads, FFN and vocabulary split over 4 chips (Megatron-style rules): a step holds the
  row-parallel products' all-reduces and nothing else; no activation, cache or kernel is
  gathered. Before the fix a step all-gathered the argmax's partial results (jnp.argmax
  over a split vocabulary), the router's top-2 and GPT-2's fused q/k/v kernel."""
  _, _, _, compiled = compile_decode(family, "tensor", spec=spec)
  step, outside = step_and_prefill(compiled)
  assert set(step.count) == {"all-reduce"}, dict(step.count)
  assert set(outside.count) == {"all-reduce"}, dict(outside.count)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_batch_1_tensor_parallel_step_holds_only_all_reduces(family):
  """Batch 1 keeps the in-place write of the [B*K] view (XLA:CPU copied every cache array
  four times a step with the 4-D write there): with one row, merging the batch into the
  heads keeps the heads' sharding, so the step still holds all-reduces alone."""
  _, _, _, compiled = compile_decode(family, "tensor", rows=1)
  step, outside = step_and_prefill(compiled)
  assert set(step.count) == {"all-reduce"}, dict(step.count)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_tensor_parallel_step_gathers_no_cache_but_a_flat_write_would(family, monkeypatch):
  """Negative control of the step check: the cache written through a [B*K] view (the
  batch-1 layout) makes the compiler gather whole caches at every step."""
  model, _, _, compiled = compile_decode(family, "tensor")
  step, _ = step_and_prefill(compiled)
  assert "all-gather" not in step.count
  monkeypatch.setattr(layers, "update_layer_cache", _flat_unless_prefill)
  _, _, _, compiled = compile_decode(family, "tensor", new_tokens=N + 1)  # a new trace
  step, _ = step_and_prefill(compiled)
  whole_cache = (
    cache_bytes(model) // model.cache_length(PROMPT, N) * model.cache_length(PROMPT, N + 1)
  )
  assert any(aot.shape_bytes(s) >= whole_cache for s in step.shapes.get("all-gather", []))


def _flat_unless_prefill(cache, k, v, index):
  if index.ndim == 0:
    return layers.write_slice(cache, k, v, index)
  return layers.write_flat(cache, k, v, index)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("mesh_axis", ["data", "tensor"])
def test_a_beam_step_moves_candidates_not_caches_or_logits(family, mesh_axis):
  """Beam search: rows over `data`, a step holds the all-alive checks alone (before the
  fix, reordering the beams over the flat B*K rows all-gathered every layer's cache). The
  vocabulary over `tensor`: the top-k of a split vocabulary exchanges each chip's best
  candidates (a few numbers per row and chip), never the logits [B*K, V] (before the fix
  the flat K*V top-k gathered them at every step) nor a cache."""
  model, _, _, compiled = compile_decode(family, mesh_axis, spec="beam")
  step, _ = step_and_prefill(compiled)
  if mesh_axis == "data":
    assert set(step.count) == {"all-reduce"} and step.count["all-reduce"] <= 2
    return
  logits = B * 2 * model.config.vocab_size * 4  # f32 [B*K, V]
  moved = [s for kind in step.shapes if kind != "all-reduce" for s in step.shapes[kind]]
  # Candidates padded to a 128-wide lane tile at most: a quarter of this tiny vocabulary.
  assert moved and max(n for s in moved for n in aot.array_bytes(s)) <= logits // 4, moved


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_fsdp_decode_step_moves_activations_not_weights(family):
  """Params split over the embedding (fsdp rules), rows over the same 4 chips: the weights
  stay where they lie; a step gathers batch activations and all-reduces the partial sums
  of the products over the split embedding (the logits [B, V] among them). Every array a
  collective carries is a block of rows (its leading axis the batch: B, or a chip's B / 4)
  or a flag; none is a weight [D, ...] or a layer's cache."""
  model, _, _, compiled = compile_decode(family, "fsdp")
  step, _ = step_and_prefill(compiled)
  assert set(step.count) == {"all-reduce", "all-gather"}, dict(step.count)
  arrays = [a for kind in step.shapes for s in step.shapes[kind] for a in _arrays(s)]
  assert arrays
  for dims in arrays:
    assert not dims or dims[0] in (B, B // 4) or dims == [1, 1, 128], arrays
  assert hidden_size(model) not in (B, B // 4)  # a weight's leading axis tells apart


def _arrays(shape: str) -> list[list[int]]:
  """The dims of each array of an HLO shape (a tuple's parts apart)."""
  return [
    [int(d) for d in dims.split(",") if d]
    for dims in re.findall(r"\b(?:pred|[su]\d+|bf16|f\d+)\[([\d,]*)\]", shape)
  ]


def test_argument_bytes_flops_and_roofline_of_a_sharded_matmul():
  """A bf16 [M, K] @ [K, N] over 4 chips, K split (fsdp-style, the product all-reduced):
  per chip the arguments are a quarter of both operands (tile-aligned shapes: no layout
  padding), XLA counts a quarter of 2 M K N FLOPs, and the product is compute-bound, so
  the roofline is FLOPs / peak plus the all-reduce of the [M, N] result over the ICI."""
  devices = aot.topology_devices("v5e:2x2")
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  m, k, n = 4096, 8192, 4096
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))
  w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
  compiled = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
  chip = aot.chip_of("v5e:2x2")
  report = aot.analyze(compiled, chip)
  assert report["memory"]["arguments"] == (m * k + k * n) * 2 // 4
  assert report["flops"] == pytest.approx(2 * m * k * n / 4, rel=0.01)
  (reduce,) = [v for kind, v in report["collectives_outside_loops"].items()]
  compute_s = report["flops"] / chip.peak_bf16_flops
  assert report["hbm_bytes"] / chip.hbm_bytes_per_s < compute_s
  expected = compute_s + reduce["bytes"] / chip.ici_bytes_per_s
  assert report["roofline_s"] == pytest.approx(expected, rel=1e-9)
  assert compute_s == pytest.approx(2 * m * k * n / 4 / 197e12, rel=0.05)


def test_a_program_that_does_not_fit_is_reported_with_the_numbers():
  _, _, _, compiled = compile_decode("gpt2", "data")
  small = dataclasses.replace(aot.chip_of("v5e:2x2"), hbm_bytes=1024.0)
  report = aot.analyze(compiled, small)
  assert not report["fits"]
  assert report["short_bytes"] == report["memory"]["total"] - 1024 > 0
  assert aot.analyze(compiled, aot.chip_of("v5e:2x2"))["fits"]


def test_collectives_are_counted_where_they_run():
  """A hand-written module: one all-gather in the entry, one all-reduce in a while body
  (reached through a call), one in the loop's condition (counted outside: it runs once
  per step too, but belongs to no body), and a reduce-scatter as XLA:TPU writes it (a
  fusion of an all-reduce, here of a tuple long enough to carry /*index=5*/, and a slice)."""
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4] parameter(0)
  ROOT %r = f32[8,4]{1,0} all-reduce(f32[8,4] %x), to_apply=%add
}

%all-reduce-scatter.3 (p: f32[8,4]) -> f32[2,4] {
  %p = f32[8,4] parameter(0)
  %r = (f32[8,4]{1,0}, f32[8,4]{1,0}, f32[8,4]{1,0}, f32[8,4]{1,0}, f32[8,4]{1,0}, /*index=5*/f32[8,4]{1,0}) all-reduce(%p, %p, %p, %p, %p, %p), to_apply=%add
  ROOT %d = f32[2,4] dynamic-slice(%r, %i), dynamic_slice_sizes={2,4}
}

%body (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]) parameter(0)
  %c = f32[8,4]{1,0} call(f32[8,4] %y), to_apply=%inner
  ROOT %o = (s32[], f32[8,4]) tuple(s32[] %i, f32[8,4] %c)
}

%cond (t: (s32[], f32[8,4])) -> pred[] {
  %p = pred[] all-reduce(pred[] %q), to_apply=%add
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: bf16[2,16]) -> (s32[], f32[8,4]) {
  %g = bf16[8,16]{1,0} all-gather(bf16[2,16] %a), dimensions={0}
  %f = f32[2,4]{1,0} fusion(f32[8,4] %x), kind=kCustom, calls=%all-reduce-scatter.3
  ROOT %w = (s32[], f32[8,4]) while((s32[], f32[8,4]) %init), condition=%cond, body=%body
}
"""
  found = aot.collectives(hlo)
  outside, (step,) = found["outside_loops"], found["loops"]
  assert dict(outside.count) == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 1}
  assert outside.bytes["all-gather"] == 8 * 16 * 2 and outside.bytes["all-reduce"] == 1
  assert outside.bytes["reduce-scatter"] == 6 * 8 * 4 * 4  # a six-array tuple, whole
  assert dict(step.count) == {"all-reduce": 1} and step.bytes["all-reduce"] == 8 * 4 * 4


def test_collectives_of_a_run_count_each_loop_trip():
  """A hand-written module: an all-gather in the entry (256 bytes), a counted loop (`i < 5`)
  whose body all-reduces 128 bytes and holds a counted loop of its own (`i < 3`, a 64-byte
  collective-permute), and a loop whose bound is a runtime value (once, 32 bytes). One run
  moves 256 + 5 x (128 + 3 x 64) + 32 bytes."""
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner_body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %q = f32[4,4]{1,0} collective-permute(f32[4,4] %y), source_target_pairs={{0,1},{1,0}}
  ROOT %o = (s32[], f32[4,4]) tuple(s32[] %i, f32[4,4] %q)
}

%inner_cond (t: (s32[], f32[4,4])) -> pred[] {
  %three = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %three), direction=LT
}

%body (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %r = f32[8,4]{1,0} all-reduce(f32[8,4] %x), to_apply=%add
  %w = (s32[], f32[4,4]) while((s32[], f32[4,4]) %init), condition=%inner_cond, body=%inner_body
  ROOT %o = (s32[], f32[8,4]) tuple(s32[] %i, f32[8,4] %r)
}

%cond (t: (s32[], f32[8,4])) -> pred[] {
  %five = u32[] constant(5)
  ROOT %lt = pred[] compare(u32[] %i, u32[] %five), direction=LT
}

%open_body (t: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %r = f32[2,4]{1,0} all-reduce(f32[2,4] %x), to_apply=%add
  ROOT %o = (s32[], f32[2,4]) tuple(s32[] %i, f32[2,4] %r)
}

%open_cond (t: (s32[], f32[2,4])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: bf16[2,16]) -> (s32[], f32[8,4]) {
  %g = bf16[8,16]{1,0} all-gather(bf16[2,16] %a), dimensions={0}
  %d = (s32[], f32[2,4]) while((s32[], f32[2,4]) %init2), condition=%open_cond, body=%open_body
  ROOT %w = (s32[], f32[8,4]) while((s32[], f32[8,4]) %init), condition=%cond, body=%body
}
"""
  comps, _ = aot.computations(hlo)
  assert [aot.trip_count(comps, c) for c in ("cond", "inner_cond", "open_cond")] == [5, 3, None]
  assert aot.collective_bytes_per_run(hlo) == 256 + 5 * (128 + 3 * 64) + 32


def test_bad_topologies_are_named():
  with pytest.raises(ValueError, match=r"unknown TPU topology 'v5e-8'.*v5e:2x4"):
    aot.topology_devices("v5e-8")
  with pytest.raises(ValueError, match=r"libtpu does not know the TPU topology 'v9z:2x2'"):
    aot.topology_devices("v9z:2x2")
  with pytest.raises(ValueError, match=r"no chip figures for 'v9z:2x2'"):
    aot.chip_of("v9z:2x2")
  devices = aot.topology_devices("v5e:2x2")
  with pytest.raises(ValueError, match="has 8 devices, but there are 4"):
    sharding.make_mesh({"data": 8}, devices)


def test_loop_flops_count_each_trip_of_a_scan_and_the_costlier_branch():
  """`aot.jaxpr_flops`, hand-counted: five scanned [8, 16] @ [16, 16] products and a cond
  whose costlier branch has one more (2 x 8 x 16 x 16 FLOPs each); its gradient three
  products for each (the forward, and the two operands' cotangents)."""

  def f(x, w):
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
    return jax.lax.cond(y.sum() > 0, lambda: y @ w, lambda: y)

  args = (jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32))
  one = 2 * 8 * 16 * 16
  assert aot.jaxpr_flops(jax.jit(f).trace(*args).jaxpr) == 6 * one
  grad = jax.jit(jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1)))
  assert aot.jaxpr_flops(grad.trace(*args).jaxpr) == 3 * 6 * one


def test_loop_flops_equal_xla_count_of_a_program_without_loops():
  """On a program without loops (a 2-layer Llama forward, and its gradient, 64 positions)
  XLA's own count (compiled for this CPU) and `aot.jaxpr_flops` agree: the products are
  the FLOPs. (XLA also counts element-wise work and drops products nothing reads.)"""
  from l2s_jax.models import llama

  cfg = llama.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
  model = llama.Llama(cfg)
  ids = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((4, 8), jnp.int32)))
  forward = lambda p, i: model.apply(p, i).astype(jnp.float32).mean()
  for fn, tol in ((forward, 0.02), (jax.grad(forward), 0.1)):
    traced = jax.jit(fn).trace(params, ids)
    cost = traced.lower().compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert aot.jaxpr_flops(traced.jaxpr) == pytest.approx(xla, rel=tol)
