"""What real jobs meet: damaged checkpoints, SIGTERM, killed evaluations, full disks, two runs
on one workdir, user errors, hostile input. Faults are injected for real: files truncated on
disk, signals sent to real subprocesses, writes that fail with ENOSPC."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_fixtures as fx
from helpers import config_path, load_config
from l2s_jax import assemble, checkpoint, eval_lib, files, hf, lock, train_lib
from l2s_jax.data import DataError, JsonlSource
from l2s_jax.metrics_log import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENV = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of 12 steps (checkpoints every 2): the losses others must match."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  fx.run(workdir, 12, 2)
  return _losses(workdir)


def _damage(step_dir, n=3):
  """Truncates the n largest array data files of a checkpoint step (orbax keeps them in
  directories named d/) to half their size; n=None: all of them."""
  data = sorted(
    (
      os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if os.path.basename(d) == "d"
    ),
    key=os.path.getsize,
    reverse=True,
  )
  hit = data if n is None else data[:n]
  for path in hit:
    os.truncate(path, os.path.getsize(path) // 2)
  return hit


# --- 1. unreadable checkpoints ----------------------------------------------------------------


def test_training_resumes_from_the_newest_readable_checkpoint(reference, tmp_path, caplog):
  """Of a finished 12-step run (checkpoints 8, 10, 12 kept), steps 12 and 10 are damaged (12:
  files truncated, caught by the inventory sealed at save; 10: its inventory removed too, so
  orbax itself fails to read it): both are named and moved aside, training resumes from step 8,
  and steps 9-12 give the uninterrupted run's losses again."""
  workdir = str(tmp_path / "run")
  fx.run(workdir, 12, 2)
  ckpts = os.path.join(workdir, "checkpoints")
  _damage(os.path.join(ckpts, "12"))
  _damage(os.path.join(ckpts, "10"), n=None)  # unsealed: every array file, for orbax to see
  os.remove(os.path.join(ckpts, "10", checkpoint.SEAL))
  caplog.set_level("WARNING")
  summary = fx.run(workdir, 12, 2)
  assert summary["step"] == 12
  log = caplog.text
  assert "checkpoint step 12" in log and "bytes" in log and "written (truncated" in log
  assert "checkpoint step 10" in log and "orbax cannot read it" in log
  assert "resuming from step 8, the newest readable checkpoint" in log
  moved = sorted(os.listdir(ckpts + ".unreadable"))
  assert [m.split("-")[0] for m in moved] == ["10", "12"]  # kept, not deleted
  resumed = _losses(workdir)
  for step in range(9, 13):
    assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / "run")
  fx.run(workdir, 4, 2)
  for step in ("2", "4"):
    _damage(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(
    checkpoint.UnreadableCheckpoint,
    match=r"no readable checkpoint in .*checkpoints: step 4 \(file .*\); "
    r"step 2 \(file",
  ):
    fx.run(workdir, 6, 2)


def test_evaluation_names_an_unreadable_checkpoint_and_falls_back_only_when_asked(tmp_path):
  c = _tiny_eval_config()
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(c, workdir)  # checkpoints at 3 and 6
  good = eval_lib.evaluate(c, workdir)
  damaged = _damage(os.path.join(workdir, "checkpoints", "6"), n=1)
  with pytest.raises(
    checkpoint.UnreadableCheckpoint,
    match=r"step 6: file .*(truncated or replaced).*checkpoint_fallback=True",
  ):
    eval_lib.evaluate(c, workdir)
  c.decode.checkpoint_fallback = True
  report = eval_lib.evaluate(c, workdir)
  assert report["step"] == 3 and good["step"] == 6
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # eval moves nothing
  assert damaged


# --- 2. preemption ---------------------------------------------------------------------------


def _wait_for(predicate, proc, seconds=240):
  deadline = time.time() + seconds
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_sigterm_saves_the_current_step_and_exits_zero(reference, tmp_path):
  """SIGTERM to the run's process group (the run and its Grain worker) once it is training (a step logged; batches arrive every 0.25 s, so the run
  is mid-way): the run saves the step it was on when it read the signal, says which, logs no
  step after it, exits 0, and a second run resumes from it to the uninterrupted run's losses.
  No checkpoint is scheduled before the last step (checkpoint_every 12): the one before it is
  the stop's own."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "train_fixtures.py"), workdir, "12", "12", "0.25"],
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # its own process group: the run and its data worker
  )
  metrics = os.path.join(workdir, "train_metrics.jsonl")

  def logged():
    return [r["step"] for r in read_jsonl(metrics)] if os.path.exists(metrics) else []

  assert _wait_for(logged, proc), "the run ended before it could be stopped"
  seen = max(logged())  # the handler is installed by now
  os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process of it
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  said = re.findall(r"stop requested \(SIGTERM\): saved step (\d+) in ", err)
  assert len(said) == 1, err[-2000:]
  stopped = int(said[0])
  assert seen <= stopped < 12, (seen, stopped)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [stopped]  # saved where it stopped
  assert max(logged()) == stopped  # and trained no further
  summary = json.load(open(os.path.join(workdir, "train_summary.json")))
  assert summary["step"] == stopped and summary["preempted"] is True
  summary = fx.run(workdir, 12, 4)  # resumes from the stop
  assert summary["step"] == 12 and "preempted" not in summary
  resumed = _losses(workdir)
  for step in range(1, 13):
    assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step


# --- 3. resumable evaluation -----------------------------------------------------------------


def _tiny_eval_config():
  c = load_config("tiny.py")
  c.train.steps, c.train.checkpoint_every, c.train.eval_every = 6, 3, 0
  c.data.synthetic.num_validation = 300
  c.decode.batch_size, c.decode.max_new_tokens = 8, 24
  return c


def test_a_killed_evaluation_continues_where_it_stopped(tmp_path):
  c = _tiny_eval_config()
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(c, workdir)
  twin = str(tmp_path / "twin")
  shutil.copytree(workdir, twin)
  whole = eval_lib.evaluate(c, twin)  # uninterrupted
  progress = os.path.join(workdir, "eval", "validation-6.progress.jsonl")
  flags = [
    f"--config={config_path('tiny.py')}",
    f"--workdir={workdir}",
    "--config.train.steps=6",
    "--config.train.checkpoint_every=3",
    "--config.data.synthetic.num_validation=300",
    "--config.decode.batch_size=8",
    "--config.decode.max_new_tokens=24",
    "--config.train.eval_every=0",
  ]
  proc = subprocess.Popen(
    [sys.executable, os.path.join(REPO, "eval.py"), *flags],
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  lines = lambda: sum(1 for _ in open(progress)) - 1 if os.path.exists(progress) else 0
  assert _wait_for(lambda: lines() >= 4, proc, 300), "the evaluation ended before the kill"
  proc.kill()
  proc.wait()
  done_before = lines()
  assert 4 <= done_before < 38  # 300 examples: 38 batches of 8
  report = eval_lib.evaluate(c, workdir)
  assert report["speed"]["batched"]["resumed_batches"] >= done_before - 1
  assert open(report["predictions_file"]).read() == open(whole["predictions_file"]).read()
  assert report["metrics"] == whole["metrics"] and report["examples"] == 300
  assert not os.path.exists(progress)


# --- 4. full disks ---------------------------------------------------------------------------


def _fail_after(monkeypatch, module, calls):
  """Makes the `calls`-th file write through `module.open` fail with ENOSPC, half written."""
  real_open, count = open, {"n": 0}

  class Full:
    def __init__(self, f):
      self.f = f

    def write(self, text):
      self.f.write(text[: len(text) // 2])
      raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  def fake_open(path, mode="r", *a, **k):
    f = real_open(path, mode, *a, **k)
    if "w" in mode:
      count["n"] += 1
      if count["n"] == calls:
        return Full(f)
    return f

  monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_a_full_disk_never_leaves_half_written_results(tmp_path, monkeypatch):
  """ENOSPC in the middle of writing eval results, a transformers directory or a summary: the
  error reaches the caller and the previous version of every file is intact."""
  c = _tiny_eval_config()
  c.data.synthetic.num_validation = 16
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(c, workdir)
  report = eval_lib.evaluate(c, workdir)
  out_dir = os.path.join(workdir, "eval")
  before = {f: open(os.path.join(out_dir, f), "rb").read() for f in os.listdir(out_dir)}
  for n in (1, 2, 4):  # predictions, hyp.txt, the JSON report
    with monkeypatch.context() as m:
      _fail_after(m, files, n)
      with pytest.raises(OSError, match="No space left"):
        eval_lib.evaluate(c, workdir)
    after = {
      f: open(os.path.join(out_dir, f), "rb").read()
      for f in os.listdir(out_dir)
      if not f.endswith(".progress.jsonl")
    }
    assert after == before, n
  assert report["examples"] == 16
  # A transformers directory: weights written through safetensors, then config.json.
  model, params = assemble.load_trained(c.copy_and_resolve_references(), workdir)
  target = str(tmp_path / "hf")
  hf.save(model.slm, params["slm"], target)
  saved = {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)}
  with monkeypatch.context() as m:
    _fail_after(m, hf.io, 1)  # config.json (weights go first)
    with pytest.raises(OSError, match="No space left"):
      hf.save(model.slm, params["slm"], target)
  assert {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)} == saved
  import safetensors.numpy as stnp

  real_save = stnp.save_file

  def partial_save(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(hf.io, "save_file", partial_save)
  with pytest.raises(OSError, match="No space left"):
    hf.save(model.slm, params["slm"], target)
  monkeypatch.setattr(hf.io, "save_file", real_save)
  assert {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)} == saved
  reloaded, reloaded_params = hf.load(target)
  np.testing.assert_array_equal(
    np.asarray(reloaded_params["shared"]["embedding"]),
    np.asarray(params["slm"]["shared"]["embedding"]),
  )


# --- 5. one writer per workdir ------------------------------------------------------------------


def test_a_second_run_on_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "train_fixtures.py"), workdir, "20000", "10000"],
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  metrics = os.path.join(workdir, "train_metrics.jsonl")
  assert _wait_for(lambda: os.path.exists(metrics), proc)
  with pytest.raises(lock.WorkdirInUse, match=f"is in use by pid {proc.pid} on "):
    fx.run(workdir, 4, 2)
  proc.kill()  # dies holding the lock
  proc.wait()
  held = json.load(open(os.path.join(workdir, ".l2s_lock")))
  assert held["pid"] == proc.pid  # the lock file is left behind...
  caplog.set_level("WARNING")
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  summary = fx.run(workdir, 4, 2)  # ...and taken over
  assert summary["step"] == 4
  assert f"taking over the lock of {workdir} left by pid {proc.pid}" in caplog.text
  assert not os.path.exists(os.path.join(workdir, ".l2s_lock"))  # released at the end


# --- 6. errors a user reads ---------------------------------------------------------------------


def test_user_errors_are_one_line_and_library_advice_is_quiet(tmp_path):
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    f"--config={config_path('tiny.py')}",
    f"--workdir={tmp_path}/w",
    "--config.llm.preset=",
    "--config.llm.path=/no/such/llm",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "/no/such/llm" in errors[0]
  assert "Traceback" not in out.stderr
  debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=ENV, timeout=300)
  assert debug.returncode != 0 and "Traceback" in debug.stderr and "/no/such/llm" in debug.stderr
  # transformers' advice about PyTorch (absent on a JAX user's machine) is not printed.
  plain = {k: v for k, v in ENV.items() if k != "TRANSFORMERS_VERBOSITY"}
  probe = (
    "import sys; sys.modules['torch'] = None\n"
    "from l2s_jax import console\n"
    "import transformers; from transformers import PreTrainedTokenizerFast\n"
  )
  quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=plain)
  assert quiet.returncode == 0 and "PyTorch was not found" not in quiet.stderr + quiet.stdout
  loud = subprocess.run(
    [sys.executable, "-c", probe.replace("from l2s_jax import console\n", "")],
    capture_output=True,
    text=True,
    env=plain,
  )
  assert "PyTorch was not found" in loud.stderr + loud.stdout  # the check can fail


# --- 7. hostile input ---------------------------------------------------------------------------


def test_jsonl_fuzz_gives_named_errors_or_documented_skips(tmp_path):
  """Random bytes, invalid UTF-8, a 10 MB line, an empty file, missing fields, wrong types:
  every file either loads, or raises DataError naming the file (and the line where there is
  one); with skip_bad_lines the bad lines are counted and skipped. Nothing else escapes."""
  rng = random.Random(0)
  good = json.dumps({"prompt": "a b", "target": "c d"})
  cases = {
    "empty": b"",
    "blank_lines": b"\n\n  \n",
    "invalid_utf8": (good + "\n").encode() + b'{"prompt": "\xff\xfe", "target": "x"}\n',
    "huge_line": (json.dumps({"prompt": "w " * 5_000_000, "target": "t"}) + "\n").encode(),
    "missing_field": (good + "\n" + json.dumps({"prompt": "p"}) + "\n").encode(),
    "wrong_type": (json.dumps({"prompt": 3, "target": "t"}) + "\n").encode(),
    "not_an_object": b"[1, 2]\n",
    "truncated_json": (good + "\n" + good[:-5] + "\n").encode(),
  }
  for i in range(40):
    cases[f"random_{i}"] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
  outcomes = {}
  for name, data in cases.items():
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    for skip in (False, True):
      try:
        src = JsonlSource(str(path), skip_bad_lines=skip)
        outcomes[(name, skip)] = ("loaded", len(src), src.skipped)
      except DataError as e:
        assert str(path) in str(e), (name, str(e)[:200])
        outcomes[(name, skip)] = ("error", str(e))
  assert outcomes[("huge_line", False)] == ("loaded", 1, 0)
  assert (
    outcomes[("empty", False)][0] == "error"
    and "no usable examples" in outcomes[("empty", False)][1]
  )
  assert "line 2: not UTF-8 text" in outcomes[("invalid_utf8", False)][1]
  assert outcomes[("invalid_utf8", True)] == ("loaded", 1, 1)
  assert "line 2: no field 'target'" in outcomes[("missing_field", False)][1]
  assert "field 'prompt' is int, not text" in outcomes[("wrong_type", False)][1]
  assert outcomes[("truncated_json", True)] == ("loaded", 1, 1)
  assert all(o[0] == "error" for (n, s), o in outcomes.items() if n.startswith("random") and not s)


def test_prompts_of_length_zero_one_and_beyond_the_positions(tmp_path):
  """Empty prompt: a named error. One word: decoded. Longer than data.max_prompt_len: cut
  to it with a warning (never beyond the model's positions, which are checked up front)."""
  from l2s_jax.config_schema import base_config
  from l2s_jax.data import build_pipeline

  c = base_config().data
  path = tmp_path / "p.jsonl"
  long_prompt = " ".join(["a"] * 400)
  path.write_text(
    "".join(
      json.dumps(r) + "\n"
      for r in (
        {"prompt": "", "target": "x"},
        {"prompt": "a", "target": "x"},
        {"prompt": long_prompt, "target": "x"},
      )
    )
  )
  c.source, c.jsonl_validation, c.tokenizer, c.max_prompt_len = "jsonl", str(path), "byt5", 32
  p = build_pipeline(c, model_kind="encoder_decoder", hybrid=False, batch_size=1)
  src = p.source("validation")
  with pytest.raises(DataError, match="example 0: empty prompt"):
    p.featurizer(src[0], 0)
  assert len(p.featurizer(src[1], 1)["inputs"]) == 2  # "a" + EOS
  assert len(p.featurizer(src[2], 2)["inputs"]) == 32  # cut, with a warning
  assert p.featurizer.truncations.prompts == 1
  np.testing.assert_array_equal(p.featurizer(src[1], 1)["inputs"], [ord("a") + 3, 1])
