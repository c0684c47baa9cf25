"""Training: frozen LLM, gradients, sharding, resume after SIGKILL, bad input."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as fx
from l2s_jax import assemble, config_schema, sharding, train_lib
from l2s_jax.checkpoint import ResumeError
from l2s_jax.hf import CheckpointError
from l2s_jax.metrics_log import read_jsonl
from l2s_jax.optimizer import make_optimizer
from l2s_jax.train_step import TrainState, loss_sums, train_step

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _built(kind="t5", **train):
  c = fx.tiny_config(kind, **train)
  run = assemble.initial(c, _one_device_mesh(), vocab_size=fx.VOCAB)
  return c, run.model, run.frozen, run.trainable


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def trained(request, tmp_path_factory):
  """A short run; returns what the tests below inspect."""
  kind = request.param
  c, model, frozen, trainable = _built(kind, steps=30, checkpoint_every=30)
  frozen_before = jax.tree.map(np.array, frozen)
  workdir = str(tmp_path_factory.mktemp(f"train_{kind}"))
  summary = train_lib.train(
    c,
    workdir,
    model=model,
    frozen=frozen,
    trainable=trainable,
    train_data=fx.ChainTask(0, 8, kind),
    mesh=_one_device_mesh(),
  )
  return kind, c, model, frozen, frozen_before, trainable, workdir, summary


def test_frozen_llm_is_bit_identical_after_training(trained):
  _, _, _, frozen, frozen_before, _, _, _ = trained
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_loss_falls(trained):
  _, _, _, _, _, _, workdir, _ = trained
  losses = [
    r["loss"] for r in read_jsonl(os.path.join(workdir, "train_metrics.jsonl")) if "loss" in r
  ]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # clearly, not by noise
  assert np.mean(losses[:5]) > math.log(fx.VOCAB) - 1.0  # started near chance


def test_optimizer_state_holds_only_trainable_leaves():
  c, model, frozen, trainable = _built()
  tx, _ = make_optimizer(c.opt, 10)
  opt_state = jax.eval_shape(tx.init, trainable)
  n_trainable = len(jax.tree.leaves(trainable))
  n_frozen = len(jax.tree.leaves(frozen))
  # Adam keeps mu and nu per trainable leaf, plus scalar counters.
  param_shaped = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
  assert len(param_shaped) == 2 * n_trainable
  assert n_frozen > 0 and set(trainable) == {"projector", "slm"}
  frozen_shapes = sorted(x.shape for x in jax.tree.leaves(frozen))
  trainable_shapes = sorted(x.shape for x in jax.tree.leaves(trainable))
  assert sorted(x.shape for x in param_shaped) == sorted(trainable_shapes * 2)
  assert frozen_shapes != trainable_shapes


def _float64(model):
  """The same hybrid computing in float64 (for a finite-difference check without round-off)."""
  import dataclasses

  f64 = lambda m: m.clone(
    config=dataclasses.replace(m.config, dtype=jnp.float64, param_dtype=jnp.float64)
  )
  return model.clone(llm=f64(model.llm), slm=f64(model.slm), dtype=jnp.float64)


def test_projector_gradient_matches_finite_differences():
  _, model, frozen, trainable = _built()
  batch = next(fx.ChainTask(3, 4, "t5"))
  with jax.enable_x64(True):
    model64 = _float64(model)
    to64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
    frozen64, trainable64 = to64(frozen), to64(trainable)
    mean_loss = lambda p: (lambda s, aux: s / aux[0])(
      *loss_sums(p, frozen64, batch, model=model64, label_smoothing=0.0)
    )
    loss = jax.jit(mean_loss)
    grads = jax.jit(jax.grad(mean_loss))(trainable64)
    assert np.abs(np.asarray(grads["projector"]["in"])).max() > 0
    assert np.abs(np.asarray(grads["projector"]["out"])).max() > 0
    rng = np.random.RandomState(0)
    for name in ("in", "in_bias", "out", "out_bias"):
      direction = rng.randn(*np.shape(trainable64["projector"][name]))
      eps = 1e-6

      def shifted(sign):
        p = jax.tree.map(lambda x: x, trainable64)
        p["projector"] = dict(p["projector"])
        p["projector"][name] = p["projector"][name] + sign * eps * direction
        return float(loss(p))

      numeric = (shifted(1) - shifted(-1)) / (2 * eps)
      analytic = float(np.sum(np.asarray(grads["projector"][name]) * direction))
      assert abs(analytic) > 1e-6, name
      assert abs(numeric - analytic) <= 1e-5 * abs(analytic) + 1e-9, (name, numeric, analytic)


def test_gradient_accumulation_equals_one_big_batch():
  c, model, frozen, trainable = _built()
  tx, schedule = make_optimizer(c.opt, 10)
  state = TrainState(step=jnp.int32(0), params=trainable, opt_state=tx.init(trainable))
  batch = next(fx.ChainTask(5, 8, "t5"))
  batch["targets_mask"][:3, 5:] = 0  # uneven token counts across micro-batches
  one = jax.jit(
    lambda s, b: train_step(
      s, frozen, b, model=model, tx=tx, grad_accum=1, label_smoothing=0.0, schedule=schedule
    )
  )(state, batch)
  four = jax.jit(
    lambda s, b: train_step(
      s, frozen, b, model=model, tx=tx, grad_accum=4, label_smoothing=0.0, schedule=schedule
    )
  )(state, batch)
  np.testing.assert_allclose(float(one[1]["loss"]), float(four[1]["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(one[1]["grad_norm"]), float(four[1]["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(four[0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_step_equals_single_device_and_params_are_sharded():
  c, model, frozen, trainable = _built()
  c.llm.rules = "fsdp_tensor"
  c.slm.rules = "fsdp_tensor"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  tx, schedule = make_optimizer(c.opt, 10)
  batch = next(fx.ChainTask(7, 8, "t5"))
  init = lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p))
  step = lambda s, f, b: train_step(
    s, f, b, model=model, tx=tx, grad_accum=1, label_smoothing=0.0, schedule=schedule
  )
  single_state, single_metrics = jax.jit(step)(init(trainable), frozen, batch)

  mesh = sharding.make_mesh(dict(c.mesh))
  trainable_sh, frozen_sh = assemble.param_shardings(model, mesh, c)
  state_sh = train_lib.state_shardings(tx, trainable, trainable_sh, mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.device_put(trainable, trainable_sh))
  frozen_dev = jax.device_put(frozen, frozen_sh)
  gbatch = sharding.global_batch(mesh, batch)
  new_state, metrics = jax.jit(
    step,
    in_shardings=(state_sh, frozen_sh, sharding.batch_shardings(mesh, gbatch)),
    out_shardings=(state_sh, None),
  )(state, frozen_dev, gbatch)
  np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
  np.testing.assert_allclose(
    float(metrics["grad_norm"]), float(single_metrics["grad_norm"]), rtol=1e-5
  )
  # Adam divides by sqrt(v): float32 round-off of tiny gradients shows up as ~1e-6 in the update.
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(single_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The rules really shard: SLM query kernel [D, N, H] over (fsdp, tensor).
  q = new_state.params["slm"]["encoder"]["layers_0"]["self_attention"]["q"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len({str(s.index) for s in q.addressable_shards}) == 4
  llm_wi = frozen_dev["encoder"]["layers_0"]["mlp"]["wi_0"]
  assert llm_wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  mu = new_state.opt_state[1][0].mu["slm"]["encoder"]["layers_0"]["self_attention"]["q"]
  assert mu.sharding.spec == q.sharding.spec
  assert gbatch["inputs"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_resume_after_sigkill_continues_exactly(tmp_path):
  steps, every = 14, 4
  reference = str(tmp_path / "reference")
  fx.run(reference, steps, every)
  expected = {
    r["step"]: r["loss"] for r in read_jsonl(os.path.join(reference, "train_metrics.jsonl"))
  }

  workdir = str(tmp_path / "killed")
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "train_fixtures.py"), workdir, str(steps), str(every)],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpt_dir)] if os.path.isdir(ckpt_dir) else []
    if any(d.isdigit() and int(d) >= 8 for d in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  logged = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
  assert max(r["step"] for r in logged) < steps  # it really was cut short

  summary = fx.run(workdir, steps, every)  # resumes from the last checkpoint
  assert summary["step"] == steps
  resumed = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
  restart = [i for i in range(1, len(resumed)) if resumed[i]["step"] <= resumed[i - 1]["step"]]
  assert len(restart) == 1
  after = resumed[restart[0] :]
  assert after[0]["step"] > 1 and after[0]["step"] - 1 in (4, 8, 12)  # from a checkpoint
  for r in after:
    assert r["loss"] == expected[r["step"]], r["step"]  # bit-identical continuation


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
  c, model, frozen, trainable = _built(steps=8, checkpoint_every=3)

  class Poisoned(fx.ChainTask):
    def __next__(self):
      b = super().__next__()
      if self.i == 5:  # the 5th batch
        b["targets_mask"] = b["targets_mask"].astype(np.float32) * np.nan
      return b

  with pytest.raises(FloatingPointError, match="at step 5.*last good checkpoint \\(step 3\\)"):
    train_lib.train(
      c,
      str(tmp_path),
      model=model,
      frozen=frozen,
      trainable=trainable,
      train_data=Poisoned(0, 8, "t5"),
      mesh=_one_device_mesh(),
    )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_resume_with_a_different_config_is_refused(tmp_path):
  c, model, frozen, trainable = _built(steps=2, checkpoint_every=2)
  train_lib.train(
    c,
    str(tmp_path),
    model=model,
    frozen=frozen,
    trainable=trainable,
    train_data=fx.ChainTask(0, 8, "t5"),
    mesh=_one_device_mesh(),
  )
  c2, model2, frozen2, trainable2 = _built(steps=4, checkpoint_every=2)
  c2.opt.learning_rate = 1e-4
  with pytest.raises(ResumeError, match="opt.learning_rate: checkpoint 0.003 vs config 0.0001"):
    train_lib.train(
      c2,
      str(tmp_path),
      model=model2,
      frozen=frozen2,
      trainable=trainable2,
      train_data=fx.ChainTask(0, 8, "t5"),
      mesh=_one_device_mesh(),
    )


def test_bad_configs_are_named():
  c = fx.tiny_config()
  c.llm.preset = ""
  c.llm.path = "/no/such/llm"
  with pytest.raises(CheckpointError, match="checkpoint directory '/no/such/llm' does not exist"):
    assemble.initial(c, _one_device_mesh(), vocab_size=fx.VOCAB)
  for bad, message in (
    ("{d_ff: 8}", "overrides is not JSON: '{d_ff: 8}'"),
    ('["d_ff"]', "overrides must be a JSON object"),
    ({"d_fff": 8}, "d_fff"),
  ):
    c = fx.tiny_config()
    with pytest.raises(ValueError, match=message):
      c.slm.overrides = bad  # the old JSON-string form is parsed as it is set
      assemble.initial(c, _one_device_mesh(), vocab_size=fx.VOCAB)
  c = fx.tiny_config()
  with pytest.raises(AttributeError):
    c.opt.learnin_rate = 1.0  # a locked group refuses new fields...
  c = fx.tiny_config()
  c.unlock()
  c.opt.learnin_rate = 1.0
  with pytest.raises(ValueError, match="unknown config field 'opt.learnin_rate'"):
    config_schema.validate(c)  # ...and validation names any that slip in
  with pytest.raises(ValueError, match="has 6 devices, but there are 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})


def test_lr_multipliers_scale_the_matched_params_updates():
  """opt.lr_multipliers: Adam's first step is -lr g / (|g| + eps) (bias-corrected, by hand);
  params whose path matches a regex move factor times that, the others exactly that."""
  c = config_schema.base_config()
  c.opt.schedule, c.opt.warmup_steps, c.opt.clip_norm = "constant", 0, 0.0
  c.opt.learning_rate = 0.01
  c.opt.lr_multipliers = (("/mlp/wo$", 0.25), ("^head", 3))
  tx, _ = make_optimizer(c.opt, 10)
  rng = np.random.default_rng(0)
  params = {
    "decoder": {
      "layers_0": {
        "mlp": {"wi": np.ones((3, 4), np.float32), "wo": np.ones((4, 3), np.float32)},
        "attn": {"wo": np.ones((3,), np.float32)},
      }
    },
    "head": np.ones((2,), np.float32),
  }
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  adam = lambda g: -0.01 * g / (np.abs(g) + c.opt.eps)
  expect = {
    "decoder/layers_0/mlp/wi": 1.0,
    "decoder/layers_0/mlp/wo": 0.25,
    "decoder/layers_0/attn/wo": 1.0,
    "head": 3.0,
  }
  flat = {
    "/".join(k.key for k in p): (u, g)
    for (p, u), g in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(grads))
  }
  assert sorted(flat) == sorted(expect)
  for name, (u, g) in flat.items():
    np.testing.assert_allclose(np.asarray(u), expect[name] * adam(g), rtol=1e-5, err_msg=name)


def _multipliers(value):
  c = config_schema.base_config()
  c.slm.preset = c.llm.preset = "t5-small"
  c.opt.lr_multipliers = value
  return c


PARAMS = {"decoder": {"mlp": {"wo": jnp.ones(2)}}}


# A malformed rule is refused by validate(), and again by make_optimizer() (which reads the
# field itself: a config built in code need not have been validated).
@pytest.mark.parametrize(
  "value, message",
  [
    ((("(", 1.0),), "opt.lr_multipliers: bad regex '(' ("),
    ((("wo", 0),), "opt.lr_multipliers: factor 0 of 'wo' must be a number > 0"),
    ((("wo", "x"),), "opt.lr_multipliers: factor 'x' of 'wo' must be a number > 0"),
    ((("wo", True),), "opt.lr_multipliers: factor True of 'wo' must be a number > 0"),
    ((("wo",),), "opt.lr_multipliers entry ('wo',): each is a (regex, factor) pair"),
    ((("wo", 1.0), ("wo", 2.0)), "opt.lr_multipliers: 'wo' is given twice"),
  ],
)
def test_bad_lr_multipliers_are_named(value, message):
  c = _multipliers(value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_schema.validate(c)
  with pytest.raises(ValueError, match=re.escape(message)):
    make_optimizer(c.opt, 10)


# The old form, a JSON object in a string, is read as the field is set: one that is no JSON
# object is refused there.
@pytest.mark.parametrize(
  "text, message",
  [
    ("{not json", "opt.lr_multipliers is not JSON: '{not json' ("),
    ("[1, 2]", "opt.lr_multipliers must be a JSON object, got '[1, 2]'"),
  ],
)
def test_a_bad_lr_multipliers_string_is_named_when_set(text, message):
  c = config_schema.base_config()
  with pytest.raises(ValueError, match=re.escape(message)):
    c.opt.lr_multipliers = text
  with pytest.warns(FutureWarning):  # negative control: a JSON object
    c.opt.lr_multipliers = '{"wo": 2}'
  assert config_schema.lr_multipliers(c.opt) == {"wo": 2.0}


def test_an_lr_multiplier_matching_no_param_is_named_at_init():
  """A well-formed regex that matches no param passes validate() and make_optimizer() (the
  params are not known there) and is named when the optimizer meets the params; the same rule
  on a param it matches passes every step (negative control)."""
  c = _multipliers((("^nothing$", 2.0),))
  config_schema.validate(c)
  tx, _ = make_optimizer(c.opt, 10)
  with pytest.raises(
    ValueError,
    match=re.escape("opt.lr_multipliers: '^nothing$' matches no param (e.g. ['decoder/mlp/wo'])"),
  ):
    tx.init(PARAMS)
  c = _multipliers((("/wo$", 2.0),))
  config_schema.validate(c)
  tx, _ = make_optimizer(c.opt, 10)
  tx.init(PARAMS)


def _train_peak_rss(jsonl: str, workdir: str, steps: int) -> int:
  """Peak resident bytes of `train.py` on the tiny config with `jsonl` as its train split
  (byte tokenizer, one worker), run as a child process."""
  flags = {
    "data.source": "jsonl",
    "data.jsonl_train": jsonl,
    "data.tokenizer": "byt5",
    "data.workers": 1,
    "data.max_prompt_len": 32,
    "data.max_target_len": 32,
    "train.steps": steps,
    "train.checkpoint_every": 5,
    "train.eval_every": 0,
    "mesh.data": 1,
  }
  proc = subprocess.Popen(
    [
      sys.executable,
      os.path.join(REPO, "train.py"),
      f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
      f"--workdir={workdir}",
    ]
    + [f"--config.{k}={v}" for k, v in flags.items()],
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  _, status, usage = os.wait4(proc.pid, 0)
  err = proc.stderr.read().decode()[-3000:]
  assert os.waitstatus_to_exitcode(status) == 0, err
  return usage.ru_maxrss * 1024  # KiB on Linux


def test_a_jsonl_file_of_two_million_lines_trains_and_resumes_in_little_memory(tmp_path):
  """2,000,000 lines (about 150 MB): indexed once, trained on and resumed (a second run on the
  workdir) with a peak resident size under 1 GiB above that of the same job on a file of
  1,000 lines (the model, JAX and the code). About 50 s; the figures are in
  docs/benchmarks.md."""
  big, small = str(tmp_path / "big.jsonl"), str(tmp_path / "small.jsonl")
  rng = np.random.default_rng(0)
  words = np.array(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"])
  with open(big, "w") as f:
    for i in range(2_000_000):
      w = " ".join(words[rng.integers(0, 8, 6)]) if i % 50_000 == 0 else "the cat sat on a mat"
      f.write(f'{{"prompt": "{i} {w}", "target": "{w} {i}"}}\n')
  with open(big) as f, open(small, "w") as g:
    for _, line in zip(range(1000), f):
      g.write(line)
  base = _train_peak_rss(small, str(tmp_path / "small_run"), 10)
  run = str(tmp_path / "big_run")
  first = _train_peak_rss(big, run, 10)
  resumed = _train_peak_rss(big, run, 20)  # resumes from step 10, the index reused
  logged = read_jsonl(os.path.join(run, "train_metrics.jsonl"))
  assert [r["step"] for r in logged if r["step"] > 10][:1] == [15]
  print(
    f"peak RSS: 1,000 lines {base / 2**20:.0f} MiB; 2M lines {first / 2**20:.0f} MiB, "
    f"resumed {resumed / 2**20:.0f} MiB"
  )
  assert max(first, resumed) - base < 2**30
