"""compile.py and `l2s_jax.compile_lib`: a config's programs compiled for TPU slices that
libtpu describes (no TPU touched), at tiny sizes: the per-chip argument bytes against a
hand count, the decoder's step, a report that does not fit, and the bad input."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from l2s_jax import aot, assemble, compile_lib
from l2s_jax.config_schema import base_config

pytest.importorskip("libtpu", reason="the TPU compile tests need libtpu (the test extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  (configs/tiny.py)


def aligned_config(mesh: dict, rules: str):
  """A one-layer Qwen2-style model whose every array is a whole number of TPU tiles per
  chip (last axis a multiple of 128, the one before of 8), so that the argument bytes the
  compiler reports carry no layout padding: a hand count must match them exactly."""
  c = base_config()
  c.model.kind = "plain"
  c.slm.preset = "qwen2-0.5b"
  c.slm.overrides = dict(
    hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=4, head_dim=128, vocab_size=1024, max_position_embeddings=512,
  )  # fmt: skip
  c.slm.rules = rules
  c.data.max_prompt_len = c.data.max_target_len = 64
  c.data.prompt_buckets = c.data.target_buckets = (64,)
  c.train.batch_size = 32
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), 1
  return c


@pytest.mark.parametrize(
  "mesh, rules", [({"data": 4}, "replicated"), ({"fsdp": 4}, "fsdp_tensor")], ids=["data", "fsdp"]
)
def test_argument_bytes_per_chip_are_the_sharded_params_and_the_batch(mesh, rules):
  """The loss step's arguments per chip: each param's bytes divided by the chips its
  logical axes split it over (by hand: the embedding axis over fsdp when the rules say
  so), plus this chip's rows of the batch arrays the loss reads (tokens, tokens_mask,
  loss_mask: int32 [B / 4, 128]; jit drops the arguments it does not read)."""
  config = aligned_config(mesh, rules)
  report = compile_lib.compile_job(config, "v5e:2x2", programs=("eval_loss",))
  run = assemble.abstract(config, compile_lib.job_mesh(config, "v5e:2x2")[0])
  split = 4 if rules == "fsdp_tensor" else 1
  d = 512
  param_bytes = 0
  for x in jax.tree.leaves(run.trainable):
    n = math.prod(x.shape) * 4  # float32
    param_bytes += n // split if d in x.shape else n  # fsdp splits the embedding axis
  batch_bytes = 3 * (32 // 4) * 128 * 4
  assert report["programs"]["eval_loss"]["memory"]["arguments"] == param_bytes + batch_bytes
  assert report["params"] == {"trainable": sum(x.size for x in jax.tree.leaves(run.trainable)),
                              "frozen": 0}  # fmt: skip


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_every_program_of_the_tiny_job_compiles_and_is_reported(topology):
  """configs/tiny.py (an LLM-to-SLM hybrid) on 4 chips (all its devices): the train step, the loss step and
  the greedy decoder with its prefill (the LLM encoder in it) and step, each with memory
  against the chip's HBM, XLA's counts and a roofline; the step's cost is the SLM's call
  (FLOPs below the prefill's, which runs the LLM encoder too); the report is plain JSON and
  the table names every program."""
  config = tiny.get_config()
  report = compile_lib.compile_job(config, topology)
  # v4: libtpu describes each of a chip's two TensorCores as a device, half a chip each.
  devices, hbm = {"v5e:2x2": (4, 16e9), "v4:2x2x1": (8, 16 * 2**30)}[topology]
  assert report["devices"] == report["mesh"]["data"] == devices
  assert report["chip"]["hbm_bytes"] == hbm
  programs = report["programs"]
  assert set(programs) == {"train_step", "eval_loss", "decode", "prefill"}
  for p in programs.values():
    assert p["fits"] and p["memory"]["total"] > 0 and p["flops"] > 0 and p["roofline_s"] > 0
  step = programs["decode"]["step"]
  assert step["counted"] == {"the model": 1}
  assert 0 < step["flops"] < programs["prefill"]["flops"]
  assert step["collectives"] == {}  # data parallel: the step holds nothing
  assert (
    programs["train_step"]["memory"]["arguments"] > programs["eval_loss"]["memory"]["arguments"]
  )
  json.dumps(compile_lib.as_json(report))
  text = compile_lib.table(report)
  for name in ("train_step", "eval_loss", "decode", "per step", "prefill", topology):
    assert name in text


def test_a_speculative_job_costs_drafts_and_the_verify():
  """Speculative decoding of the tiny SLM with a small T5 as the large model: the
  step is gamma draft calls plus one verify of gamma + 1 tokens, each compiled on its own;
  the verify reads more tokens than a one-token call of the same model."""
  config = tiny.get_config()
  config.decode.method = "speculative"
  config.collab.preset, config.collab.gamma = "t5-small", 3
  config.collab.overrides = dict(config.llm.overrides)  # 2 + 2 layers, wider than the SLM
  config.decode.batch_size = 8
  report = compile_lib.compile_job(config, "v5e:2x2", programs=("decode",))
  step = report["programs"]["decode"]["step"]
  assert step["counted"] == {"small": 3, "large_verify": 1}
  calls = step["calls"]
  assert calls["large_verify"]["flops"] > calls["large"]["flops"] > calls["small"]["flops"]
  assert step["flops"] == pytest.approx(
    3 * calls["small"]["flops"] + calls["large_verify"]["flops"]
  )


def test_a_job_that_does_not_fit_is_reported_with_the_numbers(monkeypatch):
  """A chip of 1 MiB: every program is reported as not fitting, short by its total less
  1 MiB, and the table says so; nothing raises."""
  small = aot.dataclasses.replace(aot.CHIPS["v5e"], hbm_bytes=float(2**20))
  monkeypatch.setitem(aot.CHIPS, "v5e", small)
  report = compile_lib.compile_job(tiny.get_config(), "v5e:2x2", programs=("eval_loss",))
  p = report["programs"]["eval_loss"]
  assert not p["fits"] and p["short_bytes"] == p["memory"]["total"] - 2**20 > 0
  assert "no, short" in compile_lib.table(report)


def run_compile(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "compile.py"), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )


def test_compile_py_prints_the_table_and_writes_json(tmp_path):
  out = tmp_path / "r.json"
  r = run_compile("--config", "configs/tiny.py", "--topology", "v5e:2x2", "--programs",
                  "eval_loss", "--json", str(out))  # fmt: skip
  assert r.returncode == 0, r.stderr
  assert "eval_loss" in r.stdout and "v5e:2x2: 4 x v5e" in r.stdout
  assert json.loads(out.read_text())["programs"]["eval_loss"]["fits"] is True


def test_a_bad_topology_is_one_line_naming_valid_ones():
  r = run_compile("--config", "configs/tiny.py", "--topology", "v5e-8")
  assert r.returncode == 1
  assert re.search(r"error: unknown TPU topology 'v5e-8'.*v5e:2x4", r.stderr), r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(mesh=dict(data=8)),
     r"config.mesh \{'data': 8, 'fsdp': 1, 'tensor': 1\} does not fit the topology 'v5e:2x2' "
     r"of 4 devices: .* has 8 devices, but there are 4"),
    (dict(decode=dict(method="speculative")),
     r"decode.method='speculative' decodes with System 2: set exactly one of collab.path"),
    (dict(decode=dict(weights="int8")), r"decode.weights='int8': quantized weights are not"),
  ],
  ids=["mesh", "collab", "int8"],
)  # fmt: skip
def test_bad_configs_are_named(change, message):
  config = tiny.get_config()
  for group, fields in change.items():
    for k, v in fields.items():
      config[group][k] = v
  with pytest.raises(ValueError, match=message):
    compile_lib.compile_job(config, "v5e:2x2")


def test_unknown_programs_are_named():
  with pytest.raises(ValueError, match=r"unknown programs \['train'\]: choose from train_step"):
    compile_lib.compile_job(tiny.get_config(), "v5e:2x2", programs=("train", "decode"))


def test_without_libtpu_the_error_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
  with pytest.raises(ValueError, match=r'needs libtpu: pip install "jax\[tpu\]=='):
    aot.topology_devices("v5e:2x2")


def test_an_fsdp_train_step_gathers_params_and_reduce_scatters_grads():
  """The tiny hybrid trained over fsdp (4 chips, params split on their embedding axis): the
  step all-gathers params for its products and reduce-scatters the gradients into their
  shards. Before the residual stream was pinned to the batch's layout in training, XLA
  gathered activations instead and all-reduced whole gradients (no reduce-scatter)."""
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp = 1, 4
  config.slm.rules = config.llm.rules = "fsdp_tensor"
  run = assemble.abstract(config, compile_lib.job_mesh(config, "v5e:2x2")[0])
  hlo = {}
  original = compile_lib._analyzed

  def keep(lowered, chip, *rest):
    out = original(lowered, chip, *rest)
    hlo["text"] = out["_hlo"]
    return out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(compile_lib, "_analyzed", keep)
    compile_lib.compile_job(config, "v5e:2x2", programs=("train_step",))
  found = aot.collectives(hlo["text"])["outside_loops"]
  param_sizes = {math.prod(x.shape) for x in jax.tree.leaves((run.trainable, run.frozen))}

  def param_sized(shape):
    return all(math.prod(d) in param_sizes for d in _dims(shape))

  assert found.count["reduce-scatter"] >= 1
  assert all(param_sized(s) for s in found.shapes["reduce-scatter"])
  gathered = found.shapes["all-gather"]
  params = sum(aot.shape_bytes(s) for s in gathered if param_sized(s))
  assert params >= 0.9 * found.bytes["all-gather"], (params, found.bytes["all-gather"])


def _dims(shape: str) -> list[list[int]]:
  return [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\[([\d,]*)\]", shape)]


@pytest.mark.slow  # about 2 minutes of compiling on 2 cores
def test_remat_trades_train_step_temporaries_for_flops():
  """`train.remat`: the compiled train step keeps less (temporaries per chip) and computes
  more (the blocks' forward once more) than without it, on 4 layers of 256 tokens a row."""
  reports = {}
  for remat in (False, True):
    config = aligned_config({"data": 4}, "replicated")
    config.slm.overrides = {**config.slm.overrides, "num_hidden_layers": 4}
    config.data.max_prompt_len = config.data.max_target_len = 128
    config.data.prompt_buckets = config.data.target_buckets = (128,)
    config.train.remat = remat
    reports[remat] = compile_lib.compile_job(config, "v5e:2x2", programs=("train_step",))
  plain, remat = (reports[r]["programs"]["train_step"] for r in (False, True))
  assert remat["memory"]["temporaries"] < 0.7 * plain["memory"]["temporaries"]
  assert remat["flops"] > 1.1 * plain["flops"]


def test_a_train_step_that_loops_is_timed_by_every_trip():
  """The train step of 2 layers over 2 micro-batches (a scan), and with its layers scanned
  and rematerialized, against a hand count. XLA counts a loop's body once; the report
  counts every trip.

  By hand, per token (hidden 512 = 4 heads x 128, FFN 1024, vocabulary 1024, 128
  positions): each layer's products hold 4 x 512^2 + 3 x 512 x 1024 weights, its attention
  2 x 128 x 512 multiply-adds, the head 512 x 1024. A forward pass is 2 FLOPs per
  multiply-add and a train step 3 forwards. Remat runs the layers' forward once more, but
  for the products whose outputs the backward pass does not read (the attention output
  and FFN down projections): between that and the whole forward of the layers more."""
  n = 2
  layer = 4 * 512**2 + 3 * 512 * 1024 + 2 * 128 * 512
  forward_layers, head = 2 * n * layer, 2 * 512 * 1024
  unread = 2 * n * (512**2 + 1024 * 512)
  tokens = 32 * 128 // 4  # per chip
  step = 3 * (forward_layers + head) * tokens
  reports = {}
  for name, accum, remat in (("accum", 2, False), ("remat", 1, True)):
    config = aligned_config({"data": 4}, "replicated")
    config.slm.overrides = {**config.slm.overrides, "num_hidden_layers": n}
    config.opt.grad_accum, config.train.remat = accum, remat
    report = compile_lib.compile_job(config, "v5e:2x2", programs=("train_step",))
    reports[name] = report["programs"]["train_step"]
  accum, remat = reports["accum"], reports["remat"]
  assert accum["flops"] == pytest.approx(step, rel=0.03)
  assert accum["xla_flops"] < 0.6 * step  # one micro-batch's, and the update
  low, high = step + (forward_layers - unread) * tokens, step + forward_layers * tokens
  assert 0.99 * low <= remat["flops"] <= 1.01 * high, (low, remat["flops"], high)
  assert remat["xla_flops"] < 0.8 * low  # the scanned layers once
