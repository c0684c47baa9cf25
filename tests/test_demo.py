"""The default job end to end on a tiny budget: the table comes from the eval JSON files."""

import json
import os
import shutil

import numpy as np
import pytest

from l2s_jax import demo, demo_lib, methods


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """One tiny-budget demo run shared by the tests below: (workdir, table)."""
  root = tmp_path_factory.mktemp("demo")
  return root, demo_lib.run_demo(str(root), test_budget=True)


def test_demo_pipeline_end_to_end(demo_run):
  tmp_path, table = demo_run
  files = {r["system"]: r["eval_file"] for r in table["rows"]}
  assert set(files) == {"llm", "slm", "hybrid"}
  for system, path in files.items():
    assert path.startswith(str(tmp_path / system / "eval"))
    report = json.load(open(path))
    row = next(r for r in table["rows"] if r["system"] == system)
    assert row["bleu"] == report["metrics"]["bleu"]
    assert row["tokens_per_s_batch1"] == report["speed"]["batch_1"]["generated_tokens_per_s"]
  # The hybrid's frozen LLM really is the trained LLM, loaded from its transformers export.
  hybrid_cfg = json.load(open(files["hybrid"]))
  assert hybrid_cfg["model"] == "hybrid"
  assert os.path.isfile(tmp_path / "llm" / "transformers" / "config.json")
  assert os.path.isfile(tmp_path / "quality_vs_speed.png")
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["rows"] == json.loads(json.dumps(table["rows"]))

  # Numbers are read from the eval files, not recomputed: edit one and rebuild.
  report = json.load(open(files["slm"]))
  report["metrics"]["bleu"] = 12.5
  report["speed"]["batch_1"]["latency_per_example_s"] = 0.25
  json.dump(report, open(files["slm"], "w"))
  rebuilt = demo_lib.build_table(files)
  slm = next(r for r in rebuilt["rows"] if r["system"] == "slm")
  assert slm["bleu"] == 12.5
  llm_latency = json.load(open(files["llm"]))["speed"]["batch_1"]["latency_per_example_s"]
  assert slm["speedup_batch1"] == llm_latency / 0.25
  hybrid_bleu = next(r for r in rebuilt["rows"] if r["system"] == "hybrid")["bleu"]
  assert rebuilt["targets"]["hybrid_bleu_minus_slm"] == hybrid_bleu - 12.5

  # A second run reuses every finished system instead of training again.
  mtimes = {s: os.path.getmtime(p) for s, p in files.items()}
  demo_lib.run_demo(str(tmp_path), test_budget=True)
  assert {s: os.path.getmtime(p) for s, p in files.items()} == mtimes


def _tiny_study(root, **study):
  """configs/study_demo.py on the tiny-budget demo models: 3 trained widths of 2 steps."""
  from l2s_jax.configs import study_demo

  c = study_demo.get_config(str(root))
  c.train.steps = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.data.synthetic.num_validation = 12
  c.decode.max_examples = 8
  c.decode.max_new_tokens = 6
  c.decode.batch_size = 4  # two batches of 4 prompts
  c.study.widths = (8, 12, 16)
  c.study.top1 = (0.0, 1.0)
  c.study.margin = (0.5,)
  c.study.entropy = ()
  c.study.svm_examples = 12
  c.study.sweep_on = ("slm",)
  c.study.update(study)
  return c


def test_collab_study_on_the_demo_models(demo_run):
  """The study command on tiny-budget demo models: every number is written and consistent."""
  from l2s_jax import study_lib

  tmp_path, _ = demo_run
  out = tmp_path / "collab"
  report = study_lib.run_study(_tiny_study(tmp_path), str(out))
  assert set(report["pairs"]) == {"slm", "hybrid", "slm_d8", "slm_d12", "slm_d16"}
  for name, p in report["pairs"].items():
    assert 0.0 <= p["collaboration_frequency"] <= 1.0
    assert p["large_call_rate"] == 1.0  # the oracle consults it every step
    assert p["ratio"] == report["llm"]["params"] / p["params"]
    assert sum(p["positions"]["tokens"]) == p["generated_tokens"]
    assert p["trained_here"] == name.startswith("slm_d")
  # The trained SLMs differ in width alone, with one budget.
  for w in (8, 12, 16):
    summary = json.load(open(out / f"slm_d{w}" / "train_summary.json"))
    assert summary["step"] == 2
  assert report["pairs"]["slm_d8"]["params"] < report["pairs"]["slm_d16"]["params"]
  rows = {(r["router"], r["threshold"]): r for r in report["sweep"]}
  assert all(r["seconds"] > 0 for r in rows.values())
  never, always = rows[("top1", 0.0)], rows[("top1", 1.0)]
  assert never["large_call_rate"] == never["batch_call_rate"] == 0.0  # p1 < 0 never holds
  assert never["large_tokens_read_per_token"] == 0.0  # routed: the LLM never ran
  assert never["quality"] == report["pairs"]["slm"]["quality_slm"]
  # p1 < 1 holds at every token of these barely trained SLMs: the LLM chooses every token.
  assert always["large_call_rate"] == 1.0 and always["quality"] == report["llm"]["quality"]
  margin = rows[("margin", 0.5)]
  # A batch runs the LLM when any of its rows fires.
  assert margin["batch_call_rate"] >= margin["large_call_rate"] - 1e-12
  spec = rows[("speculative", 5.0)]
  assert spec["quality"] == report["llm"]["quality"]  # lossless
  svm = report["svm_router"]["slm"]
  assert "error" not in svm, svm["error"]
  from l2s_jax.collab import svm_router

  assert svm_router.load(svm["file"]).k == svm["k"] == 8 and ("svm", 0.0) in rows
  # The law is fitted on the three trained pairs only (one budget), to their own numbers.
  law = report["scaling_law"]
  trained = sorted(
    (p["ratio"], p["collaboration_frequency"])
    for n, p in report["pairs"].items()
    if n.startswith("slm_d")
  )
  assert "error" not in law, law["error"]
  assert law["x"] == [x for x, _ in trained] and law["y"] == [y for _, y in trained]
  x = np.asarray(law["x"])
  predicted = law["b"] - law["a"] * x ** -law["alpha"]
  np.testing.assert_allclose(law["predicted"], predicted, rtol=1e-9)
  assert min(law["a"], law["alpha"], law["b"]) >= 0.05 - 1e-12
  assert (out / "scaling.png").exists() == law["is_law"] == (law["at_bounds"] == [])
  saved = json.load(open(out / "study.json"))
  assert saved["sweep"] == json.loads(json.dumps(report["sweep"]))
  assert (out / "positions.png").exists() and (out / "sweep_slm.png").exists()
  # The summary prints every pair and router row.
  text = study_lib.summary(report)
  assert all(name in text for name in report["pairs"])


def test_collab_study_bad_input(demo_run, tmp_path):
  from l2s_jax import study_lib

  root, _ = demo_run
  # Two pairs cannot fit the law: said why, not fitted (the trained SLMs are reused).
  report = study_lib.run_study(
    _tiny_study(root, slms=(), sweep_on=(), widths=(8, 12), top1=(), margin=(), svm=""),
    str(root / "collab"),
  )
  assert "needs >= 3 pairs" in report["scaling_law"]["error"] and "a" not in report["scaling_law"]
  with pytest.raises(ValueError, match=r"study.top1 thresholds \[1.5\] out of range"):
    study_lib.run_study(_tiny_study(root, top1=(0.5, 1.5)), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"study.margin thresholds \[0.6\].*'half'"):
    c = _tiny_study(root, margin=(0.6,))
    c.collab.router_margin = "half"
    study_lib.run_study(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match=r"set exactly one of collab.workdir.*'preset', 'workdir'"):
    c = _tiny_study(root)
    c.collab.preset = "t5-small"
    study_lib.run_study(c, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="study.slms entry 'nowhere'"):
    study_lib.run_study(_tiny_study(root, slms=("nowhere",)), str(tmp_path / "c"))
  # An SLM whose vocabulary is not the LLM's: named, with both sizes.
  import torch_reference as ref

  other = tmp_path / "gpt2_1000"
  ref.gpt2(seed=0, vocab_size=1000, n_positions=64).save_pretrained(other)
  with pytest.raises(
    ValueError,
    match=r"study SLM wide_vocab \(path:.*gpt2_1000\).*"
    r"wide_vocab: 1000",
  ):
    c = _tiny_study(root, slms=(f"wide_vocab=path:{other}",), sweep_on=(), widths=())
    study_lib.run_study(c, str(tmp_path / "d"))
  # An SVM file of another top-k width than study.svm_k: refused before anything runs.
  from l2s_jax.collab import svm_router

  rng = np.random.RandomState(0)
  x = np.sort(rng.dirichlet(np.ones(8), 60), axis=1)[:, ::-1]
  svm_file = str(tmp_path / "svm8.json")
  svm_router.save(svm_router.fit(x, x[:, 0] < 0.3), svm_file)
  with pytest.raises(ValueError, match="top-k width k=8; expected k=4"):
    study_lib.run_study(_tiny_study(root, svm=svm_file, svm_k=4), str(tmp_path / "e"))
  assert not (tmp_path / "e").exists()
  assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_load_system_gives_the_evaluated_model(demo_run):
  """demo_lib.load_system (the speculative bench's LLM-to-SLM draft) restores the model and
  trained params that the demo evaluated: decoding with them reproduces its predictions."""
  from l2s_jax import assemble, eval_lib

  root, table = demo_run
  model, params = demo_lib.load_system(str(root), "hybrid")
  c = demo_lib.system_config("hybrid", str(root), test_budget=True)
  pipeline = assemble.data_pipeline(c, str(root / "hybrid"), batch_size=1, training=False)
  out = eval_lib.decode_split(
    methods.for_model(c, model, params, pipeline),
    pipeline,
    c.decode.split,
    batch_size=c.decode.batch_size,
    max_examples=c.decode.max_examples,
  )
  report = json.load(open(next(r["eval_file"] for r in table["rows"] if r["system"] == "hybrid")))
  expected = [json.loads(line)["hypothesis"] for line in open(report["predictions_file"])]
  assert [r["hypothesis"] for r in out["rows"]] == expected
  assert len(expected) > 1
  with pytest.raises(FileNotFoundError, match="no exported LLM"):
    demo_lib.load_system(str(root / "missing"), "hybrid")
  with pytest.raises(FileNotFoundError, match=f"{root}/llm_wide/transformers: no exported LLM"):
    demo_lib.load_system(str(root), "hybrid_wide")
  with pytest.raises(ValueError, match="which='tiny'"):
    demo_lib.load_system(str(root), "tiny")


def test_export_command_writes_the_trained_plain_model(demo_run, tmp_path, capsys):
  """`python -m l2s_jax.demo --export slm` writes DIR/slm/transformers; decoding with what it
  wrote reproduces the predictions the demo's evaluation wrote for the SLM. Without
  checkpoints the command names the directory."""
  from l2s_jax import assemble, eval_lib, hf

  root, table = demo_run
  shutil.copytree(root / "slm", tmp_path / "slm", ignore=shutil.ignore_patterns("transformers"))
  demo.main(["--workdir", str(tmp_path), "--test_budget", "--export", "slm"])
  model, params = hf.load(str(tmp_path / "slm" / "transformers"))
  c = demo_lib.system_config("slm", test_budget=True)
  pipeline = assemble.data_pipeline(c, str(tmp_path / "slm"), batch_size=1, training=False)
  out = eval_lib.decode_split(
    methods.for_model(c, model, params, pipeline),
    pipeline,
    c.decode.split,
    batch_size=c.decode.batch_size,
    max_examples=c.decode.max_examples,
  )
  report = json.load(open(next(r["eval_file"] for r in table["rows"] if r["system"] == "slm")))
  expected = [json.loads(line)["hypothesis"] for line in open(report["predictions_file"])]
  assert [r["hypothesis"] for r in out["rows"]] == expected and len(expected) > 1
  with pytest.raises(SystemExit) as stop:
    demo.main(["--workdir", str(tmp_path), "--export", "llm_wide"])
  assert stop.value.code == 1
  assert f"error: {tmp_path}/llm_wide: no checkpoints" in capsys.readouterr().err


def test_study_command_reports_a_bad_config_in_one_line(tmp_path):
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
    sys.executable,
    os.path.join(repo, "study.py"),
    f"--config={os.path.join(repo, 'configs', 'study_demo.py')}:{tmp_path}",
    f"--workdir={tmp_path / 'study'}",
    "--config.study.entropy=(-0.5,)",
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
  assert res.returncode != 0
  assert "study.entropy thresholds [-0.5] out of range" in res.stderr
  assert "Traceback" not in res.stderr and not (tmp_path / "study").exists()
