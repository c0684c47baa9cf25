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


def test_collab_analysis_on_the_demo_models(demo_run):
  """The analysis command on tiny-budget demo models: every number is written and consistent."""
  from l2s_jax import study_lib
  tmp_path, _ = demo_run
  report = study_lib.analyze(str(tmp_path), sizes=(8, 12), steps=2, examples=6, max_new_tokens=6,
                           sweeps={"top1": (0.0, 1.01), "margin": (0.5,)})
  assert set(report["pairs"]) == {"demo_slm", "slm_d8", "slm_d12"}
  for p in report["pairs"].values():
    assert 0.0 <= p["collaboration_frequency"] <= 1.0
    assert p["ratio"] == report["llm"]["params"] / p["params"]
    assert sum(p["positions"]["tokens"]) > 0
  rows = {(r["router"], r["threshold"]): r for r in report["sweep"]}
  assert all(r["seconds"] > 0 and r["batch_call_rate"] >= r["call_rate"] for r in rows.values())
  assert rows[("top1", 0.0)]["llm_tokens_read"] == 0      # routed: the LLM never ran
  if "error" not in report["svm_router"]:
    from l2s_jax.collab import svm_router
    router = svm_router.load(report["svm_router"]["file"])
    assert router.k == report["svm_router"]["k"] and ("svm", 0.0) in rows
  assert rows[("top1", 0.0)]["call_rate"] == 0.0          # p1 < 0 never holds
  assert rows[("top1", 1.01)]["call_rate"] == 1.0         # p1 < 1.01 always holds
  assert rows[("top1", 1.01)]["bleu"] == report["pairs"]["demo_slm"]["bleu_llm"]
  assert rows[("top1", 0.0)]["bleu"] == report["pairs"]["demo_slm"]["bleu_slm"]
  # The law is fitted to the pairs' own numbers, or its failure reported (and not plotted).
  law = report["scaling_law"]
  pairs = sorted(report["pairs"].values(), key=lambda p: p["ratio"])
  if "error" in law:
    assert "a" not in law and not os.path.isfile(tmp_path / "collab" / "scaling.png")
  else:
    assert law["x"] == [p["ratio"] for p in pairs]
    assert law["y"] == [p["collaboration_frequency"] for p in pairs]
    x, y = np.asarray(law["x"]), np.asarray(law["y"])
    predicted = law["b"] - law["a"] * x ** -law["alpha"]
    np.testing.assert_allclose(law["predicted"], predicted, rtol=1e-9)
    r2 = 1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert law["r2"] == pytest.approx(r2, rel=1e-9)
    assert min(law["a"], law["alpha"], law["b"]) >= 0.05 - 1e-12
    assert os.path.isfile(tmp_path / "collab" / "scaling.png") == law["is_law"]
    assert law["is_law"] == (law["at_bounds"] == [])
  saved = json.load(open(tmp_path / "collab" / "analysis.json"))
  assert saved["sweep"] == json.loads(json.dumps(report["sweep"]))
  assert os.path.isfile(tmp_path / "collab" / "positions.png")


def test_load_system_gives_the_evaluated_model(demo_run):
  """demo_lib.load_system (the speculative bench's LLM-to-SLM draft) restores the model and
  trained params that the demo evaluated: decoding with them reproduces its predictions."""
  from l2s_jax import assemble, eval_lib
  root, table = demo_run
  model, params = demo_lib.load_system(str(root), "hybrid")
  c = demo_lib.system_config("hybrid", str(root), test_budget=True)
  pipeline = assemble.data_pipeline(c, str(root / "hybrid"), batch_size=1, training=False)
  out = eval_lib.decode_split(methods.for_model(c, model, params, pipeline), pipeline,
                              c.decode.split, batch_size=c.decode.batch_size,
                              max_examples=c.decode.max_examples)
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
  out = eval_lib.decode_split(methods.for_model(c, model, params, pipeline), pipeline,
                              c.decode.split, batch_size=c.decode.batch_size,
                              max_examples=c.decode.max_examples)
  report = json.load(open(next(r["eval_file"] for r in table["rows"] if r["system"] == "slm")))
  expected = [json.loads(line)["hypothesis"] for line in open(report["predictions_file"])]
  assert [r["hypothesis"] for r in out["rows"]] == expected and len(expected) > 1
  with pytest.raises(SystemExit) as stop:
    demo.main(["--workdir", str(tmp_path), "--export", "llm_wide"])
  assert stop.value.code == 1
  assert f"error: {tmp_path}/llm_wide: no checkpoints" in capsys.readouterr().err
