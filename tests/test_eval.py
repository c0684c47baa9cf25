"""eval.py's library: metrics equal the reference CLIs, exact example counts, exports."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from l2s_jax import build, eval_lib, export, metrics, train_lib
from l2s_jax.decoding import generate

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "configs"))


def _tiny_config(steps=6):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(HERE, "..", "configs",
                                                                     "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.steps = steps
  c.train.checkpoint_every = steps
  c.train.eval_every = 0
  c.data.synthetic.num_validation = 13      # not a multiple of the batch size
  c.decode.batch_size = 8
  c.decode.max_new_tokens = 12
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  c = _tiny_config()
  train_lib.train_and_evaluate(c, workdir)
  return c, workdir


def _drop_fourth_word(text: str) -> str:
  return " ".join(w for i, w in enumerate(text.split()) if i != 3)


def test_bleu_and_chrf_equal_sacrebleu_cli(trained, monkeypatch):
  c, workdir = trained
  # Realistic, mid-range scores: the hypothesis is the reference with words dropped.
  real = eval_lib.decode_split
  def decode_with_known_hyps(*a, **k):
    out = real(*a, **k)
    for r in out["rows"]:
      r["hypothesis"] = _drop_fourth_word(r["reference"])
    return out
  monkeypatch.setattr(eval_lib, "decode_split", decode_with_known_hyps)
  report = eval_lib.evaluate(c, workdir)
  base = report["predictions_file"][:-len(".predictions.jsonl")]
  cli = subprocess.run([sys.executable, "-m", "sacrebleu", base + ".ref.txt", "-i",
                        base + ".hyp.txt", "-m", "bleu", "chrf", "-w", "4"],
                       capture_output=True, text=True, check=True)
  bleu, chrf = json.loads(cli.stdout)
  assert 20 < report["metrics"]["bleu"] < 95
  assert report["metrics"]["bleu"] == pytest.approx(bleu["score"], abs=1e-4)
  assert report["metrics"]["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
  assert report["metrics"]["bleu_signature"] == bleu["signature"]


def test_rouge_equals_rouge_score_cli(tmp_path):
  refs = ["the cat sat on the mat.\nit was happy.", "stocks rallied on monday after gains",
          "a new study finds coffee is good", "rain is expected across the north"]
  hyps = ["the cat sat on a mat.\nit was glad.", "stocks fell on monday",
          "coffee is good says a study", "sunny skies across the south"]
  ours = metrics.summarization_scores(hyps, refs)
  (tmp_path / "t.txt").write_text("".join(r.replace("\n", " ") + "\n" for r in refs))
  (tmp_path / "p.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hyps))
  subprocess.run([sys.executable, "-m", "rouge_score.rouge",
                  f"--target_filepattern={tmp_path / 't.txt'}",
                  f"--prediction_filepattern={tmp_path / 'p.txt'}",
                  f"--output_filename={tmp_path / 'out.csv'}", "--use_stemmer=true",
                  "--aggregate=false", "--rouge_types=rouge1,rouge2,rougeL"],
                 check=True, capture_output=True)
  import csv
  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert len(rows) == 4
  for kind in ("rouge1", "rouge2", "rougeL"):
    f = [float(r[f"{kind}-F"]) for r in rows]      # printed to 6 decimals
    assert ours[kind] == pytest.approx(100 * np.mean(f), abs=1e-4), kind
  assert 0 < ours["rouge2"] < ours["rouge1"] < 100


def test_scores_exactly_n_examples(trained):
  c, workdir = trained
  report = eval_lib.evaluate(c, workdir)
  assert report["examples"] == 13
  lines = open(report["predictions_file"]).read().splitlines()
  assert len(lines) == 13
  indices = sorted(json.loads(l)["reference"] for l in lines)
  assert len(set(indices)) == 13 or len(indices) == 13
  assert report["speed"]["batched"]["examples"] == 13
  saved = json.load(open(os.path.join(workdir, "eval", "validation-6.json")))
  assert saved["metrics"]["bleu"] == report["metrics"]["bleu"]


def test_exports_reload_and_generate_identically(trained, tmp_path):
  c, workdir = trained
  from l2s_jax.data import build_pipeline
  from l2s_jax.train_lib import _slm_kind
  pipeline = build_pipeline(c.data, model_kind=_slm_kind(c), hybrid=True, batch_size=8,
                            workdir=workdir)
  model, frozen, trainable = build.build(c, vocab_size=pipeline.vocab_size)
  step, params = eval_lib.load_params_for_eval(c, workdir, model, frozen, trainable)
  assert step == 6
  batch = next(pipeline.iterator("validation", shuffle=False, repeat=False))
  ids, mask = batch["inputs"], batch["inputs_mask"]
  extra = {"llm_input_ids": batch["llm_inputs"], "llm_attention_mask": batch["llm_inputs_mask"]}
  live = generate(model, params, ids, mask, max_new_tokens=10, eos_id=1, extra_inputs=extra,
                  prompt_buckets=None)

  # 1. params export -> eval's loader -> same generations.
  trained_params = {k: v for k, v in params.items() if k != "llm"}
  export.export_params(trained_params, str(tmp_path / "params"), config=c, step=step)
  c2 = _tiny_config()
  c2.decode.params = "export:" + str(tmp_path / "params")
  _, params2 = eval_lib.load_params_for_eval(c2, workdir, model, frozen, trainable)
  again = generate(model, params2, ids, mask, max_new_tokens=10, eos_id=1, extra_inputs=extra,
                   prompt_buckets=None)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(live.tokens))

  # 2. the SLM as a transformers directory -> same generations as the SLM in memory.
  export.export_transformers(model.slm, params["slm"], str(tmp_path / "hf"), config=c, step=step)
  _, slm, slm_params = export.load_transformers(str(tmp_path / "hf"))
  a = generate(slm, slm_params, ids, mask, max_new_tokens=10, eos_id=1)
  b = generate(model.slm, params["slm"], ids, mask, max_new_tokens=10, eos_id=1)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))

  # 3. the serialized hybrid generate -> same generations as the live one.
  shapes = {k: (np.shape(v), np.int32) for k, v in extra.items()}
  export.export_generate(model, params, str(tmp_path / "hlo"), batch=ids.shape[0],
                         prompt_len=ids.shape[1], max_new_tokens=10, eos_id=1,
                         extra_shapes=shapes, config=c, step=step)
  manifest, run = export.load_generate(str(tmp_path / "hlo"))
  tokens, lengths = run(ids, mask, **extra)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(live.tokens))
  assert manifest["source_step"] == 6 and manifest["config"]["model"]["kind"] == "hybrid"
