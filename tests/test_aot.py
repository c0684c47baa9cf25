"""Programs compiled ahead of time for TPU slices that libtpu describes (no TPU is touched):
the collectives a decoding step holds on data- and tensor-parallel meshes, the per-chip
argument bytes, the fit report and the bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from l2s_jax import aot, build, sharding
from l2s_jax.decoding import Sample, lower
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


def compile_decode(family, mesh_axis, topology="v5e:2x2", new_tokens=N):
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh({mesh_axis: len(devices)}, devices)
  model = tiny(family)
  rules = "replicated" if mesh_axis == "data" else "fsdp_tensor"
  params = abstract_params(model, mesh, rules)
  ids = jax.ShapeDtypeStruct((B, PROMPT), jnp.int32)
  lowered = lower(Sample(), model, params, ids, max_new_tokens=new_tokens, eos_id=1, mesh=mesh)
  return model, params, mesh, lowered.compile()


def hidden_size(model):
  c = model.config
  return getattr(c, "d_model", None) or getattr(c, "n_embd", None) or c.hidden_size


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_a_data_parallel_decode_step_holds_only_the_stop_check(family):
  """Params replicated, rows split over 4 chips: the step's body holds no collective; the
  loop's condition, the all-rows-done check, holds the one all-reduce (of a scalar)."""
  _, _, _, compiled = compile_decode(family, "data")
  report = aot.analyze(compiled, aot.chip_of("v5e:2x2"))
  (step,) = report["collectives_per_loop_step"]
  assert step == {}
  outside = report["collectives_outside_loops"]
  assert outside["all-reduce"] == {"count": 1, "bytes": 4}, outside


def cache_bytes(model) -> int:
  """Bytes of one layer's whole key (or value) cache [B, K, S, H] as the decoder sizes it."""
  slots = model.cache_length(PROMPT, N)
  v = jax.eval_shape(lambda: model.init_cache(B, slots))["layers"][0]["v"]
  return int(np.prod(v.shape)) * v.dtype.itemsize


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_a_tensor_parallel_decode_step_gathers_no_cache(family, monkeypatch):
  """Heads and FFN split over 4 chips (Megatron-style rules): a step holds the row-parallel
  products' all-reduces and gathers no layer's cache. T5 and Qwen2 gather no activation
  [B, D] either: what they gather is the vocabulary-parallel argmax's partial results (a
  value and an index per row and chip). GPT-2 still gathers its fused q/k/v kernel
  [D, 3, N, H] at every step (the (3, N, H) axes merged for one product; not fixed yet).
  Negative control: the cache written through a [B*K] view (the batch-1 layout) makes the
  compiler gather whole caches at every step."""
  model, _, _, compiled = compile_decode(family, "tensor")
  activation, whole_cache = B * hidden_size(model) * 2, cache_bytes(model)  # bf16
  (step,) = aot.collectives(compiled.as_text())["loops"]
  gathers = step.shapes.get("all-gather", [])
  assert step.count["all-reduce"] >= 2
  assert all(aot.shape_bytes(s) < whole_cache for s in gathers), gathers
  if family != "gpt2":
    assert all(aot.shape_bytes(s) < activation for s in gathers), gathers
  assert step.count["collective-permute"] == 0 and step.count["all-to-all"] == 0

  monkeypatch.setattr(layers, "update_layer_cache", layers.write_flat)
  _, _, _, compiled = compile_decode(family, "tensor", new_tokens=N + 1)  # a new trace
  (step,) = aot.collectives(compiled.as_text())["loops"]
  slots = model.cache_length(PROMPT, N + 1)
  whole_cache = whole_cache // model.cache_length(PROMPT, N) * slots
  assert any(aot.shape_bytes(s) >= whole_cache for s in step.shapes.get("all-gather", []))


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
  per step too, but belongs to no body)."""
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4] parameter(0)
  ROOT %r = f32[8,4]{1,0} all-reduce(f32[8,4] %x), to_apply=%add
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
  ROOT %w = (s32[], f32[8,4]) while((s32[], f32[8,4]) %init), condition=%cond, body=%body
}
"""
  found = aot.collectives(hlo)
  outside, (step,) = found["outside_loops"], found["loops"]
  assert dict(outside.count) == {"all-gather": 1, "all-reduce": 1}
  assert outside.bytes["all-gather"] == 8 * 16 * 2 and outside.bytes["all-reduce"] == 1
  assert dict(step.count) == {"all-reduce": 1} and step.bytes["all-reduce"] == 8 * 4 * 4


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
