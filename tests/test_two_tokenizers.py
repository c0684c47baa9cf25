"""The paper's decoder-only setting end to end with two tokenizers: a T5 LLM reading a
SentencePiece Unigram tokenizer, a GPT-2 or Llama SLM a byte-level BPE (configs/
tiny_two_tokenizers.py), trained with char-span pooling, generated greedy and with beams from
right- and left-padded prompts, evaluated with eval.py's library, exported and reloaded."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import config_path, load_config
from l2s_jax import assemble, eval_lib, hf, train_lib
from l2s_jax.decoding import beam_search, generate
from l2s_jax.metrics_log import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = 30


def config(slm: str):
  c = load_config("tiny_two_tokenizers.py", slm)
  c.train.steps, c.train.checkpoint_every, c.train.log_every = STEPS, STEPS, 1
  c.data.synthetic.num_validation = 8
  c.decode.batch_size, c.decode.max_new_tokens = 8, 12
  return c


# The Llama SLM variant runs with -m slow (CI time); GPT-2 covers the two-tokenizer path in CI,
# and Llama's decoding is checked against transformers in test_models_decoder_only.py.
@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def trained(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(f"two_tok_{request.param}"))
  c = config(request.param)
  train_lib.train_and_evaluate(c, workdir)
  return c, workdir, request.param


def _batch(c, workdir):
  """The validation batch, the trained model and params, and the pieces of its prompts."""
  run = assemble.for_evaluation(c, workdir)
  batch = next(iter(run.pipeline.iterator("validation", shuffle=False, repeat=False)))
  lengths = batch["prompt_lengths"]
  width = int(lengths.max())
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  ids = batch["tokens"][:, :width] * mask
  extra = {
    "llm_input_ids": batch["llm_inputs"],
    "llm_attention_mask": batch["llm_inputs_mask"],
    "overlap": batch["overlap"][:, :width],
  }
  return run, ids, mask, extra


def test_loss_falls_and_the_tokenizers_differ(trained):
  c, workdir, slm = trained
  losses = [
    r["loss"] for r in read_jsonl(os.path.join(workdir, "train_metrics.jsonl")) if "loss" in r
  ]
  assert len(losses) == STEPS and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
  bpe = json.load(open(os.path.join(workdir, "tokenizer", "tokenizer_config.json")))
  unigram = json.load(open(os.path.join(workdir, "llm_tokenizer", "tokenizer_config.json")))
  assert (bpe["tokenizer_class"], unigram["tokenizer_class"]) == ("GPT2Tokenizer", "T5Tokenizer")


def _reference_greedy(model, params, ids, mask, extra, row, n, eos):
  """Greedy decoding by full forwards over the growing sequence (no cache, no bucketing),
  right-padded to one width so that it compiles once (causal: the padding comes after)."""
  p = int(mask[row].sum())
  width = p + n
  forward = jax.jit(
    lambda x, m, pm: model.apply(
      {"params": params},
      x,
      m,
      llm_input_ids=extra["llm_input_ids"][row : row + 1],
      llm_attention_mask=extra["llm_attention_mask"][row : row + 1],
      overlap=extra["overlap"][row : row + 1, :p],
      prompt_mask=pm,
    )
  )
  toks = list(ids[row, :p])
  out = []
  for _ in range(n):
    x = np.zeros((1, width), np.int32)
    x[0, : len(toks)] = toks
    m = (np.arange(width) < len(toks)).astype(np.int32)[None]
    prompt_mask = (np.arange(width) < p).astype(np.int32)[None]
    t = int(np.argmax(np.asarray(forward(x, m, prompt_mask)[0, len(toks) - 1])))
    out.append(t)
    toks.append(t)
    if t == eos:
      break
  return out


def _left_padded(ids, mask, extra):
  """The same prompts left-padded on both sides (the overlap moved with both layouts)."""

  def left(x_BP, m_BP, axis_len):
    out = np.zeros_like(x_BP)
    shift = axis_len - m_BP.sum(1)
    for r in range(x_BP.shape[0]):
      out[r, shift[r] :] = x_BP[r, : axis_len - shift[r]]
    return out, shift

  l_ids, s_shift = left(ids, mask, ids.shape[1])
  l_mask, _ = left(mask, mask, mask.shape[1])
  m = extra["llm_attention_mask"]
  l_llm, m_shift = left(extra["llm_input_ids"], m, m.shape[1])
  l_llm_mask, _ = left(m, m, m.shape[1])
  ov = extra["overlap"]
  l_ov = np.zeros_like(ov)
  for r in range(ov.shape[0]):
    rows, cols = ov.shape[1] - s_shift[r], ov.shape[2] - m_shift[r]
    l_ov[r, s_shift[r] :, m_shift[r] :] = ov[r, :rows, :cols]
  assert (l_mask[:, 0] == 0).any()  # some rows really are left-padded
  return l_ids, l_mask, {"llm_input_ids": l_llm, "llm_attention_mask": l_llm_mask, "overlap": l_ov}


def test_greedy_follows_full_forwards_and_padding_side_does_not_matter(trained):
  c, workdir, slm = trained
  run, ids, mask, extra = _batch(c, workdir)
  model, params = run.compute_model, run.params
  eos, n = run.pipeline.tokenizer.eos_id, c.decode.max_new_tokens
  right = generate(model, params, ids, mask, max_new_tokens=n, eos_id=eos, extra_inputs=extra)
  for row in range(ids.shape[0]):
    ref = _reference_greedy(model, params, ids, mask, extra, row, n, eos)
    assert list(right.tokens[row, : len(ref)]) == ref, row
  l_ids, l_mask, l_extra = _left_padded(ids, mask, extra)
  left = generate(model, params, l_ids, l_mask, max_new_tokens=n, eos_id=eos, extra_inputs=l_extra)
  np.testing.assert_array_equal(left.tokens, right.tokens)
  beams = [
    beam_search(model, params, a, b, max_new_tokens=n, num_beams=3, eos_id=eos, extra_inputs=e)
    for a, b, e in ((ids, mask, extra), (l_ids, l_mask, l_extra))
  ]
  np.testing.assert_array_equal(beams[0].tokens, beams[1].tokens)
  np.testing.assert_allclose(beams[0].scores, beams[1].scores, rtol=1e-5)


def test_eval_greedy_and_beam_then_export_and_reload(trained, tmp_path):
  c, workdir, slm = trained
  reports = {}
  for method in ("greedy", "beam"):
    e = c.copy_and_resolve_references()
    e.decode.method = method
    e.decode.num_beams = 3 if method == "beam" else 1
    reports[method] = eval_lib.evaluate(e, workdir)
    assert 0 <= reports[method]["metrics"]["bleu"] <= 100
  rows = [json.loads(line) for line in open(reports["greedy"]["predictions_file"])]
  assert len(rows) == 8 and all(isinstance(r["hypothesis"], str) for r in rows)
  # export.py writes the params with both tokenizers; evaluated from the export alone, in a
  # fresh workdir, the predictions are the same.
  out = str(tmp_path / "export")
  cmd = [
    sys.executable,
    os.path.join(REPO, "export.py"),
    f"--config={config_path('tiny_two_tokenizers.py')}:{slm}",
    f"--workdir={workdir}",
    "--kind=params",
    f"--out={out}",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"exported step {STEPS} (params)" in done.stdout
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert manifest["tokenizers"] == ["llm_tokenizer", "tokenizer"]
  again = c.copy_and_resolve_references()
  again.decode.params = f"export:{out}"
  again.data.tokenizer = os.path.join(out, "tokenizer")
  again.data.llm_tokenizer = os.path.join(out, "llm_tokenizer")
  report = eval_lib.evaluate(again, str(tmp_path / "fresh"))
  assert report["predictions_file"].endswith(f"validation-{STEPS}.export.predictions.jsonl")
  assert [json.loads(line) for line in open(report["predictions_file"])] == rows
  assert not os.path.exists(tmp_path / "fresh" / "tokenizer")  # nothing retrained
  # Exporting again without --overwrite is refused; the export is kept.
  again_cmd = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert again_cmd.returncode == 1 and "already exists" in again_cmd.stderr
  assert json.load(open(os.path.join(out, "manifest.json"))) == manifest


def test_an_llm_checkpoint_smaller_than_its_tokenizer_is_refused(trained, tmp_path):
  c, workdir, slm = trained
  small = c.copy_and_resolve_references()
  small.model.kind = "plain"
  small.slm.preset, small.slm.overrides = c.llm.preset, {**c.llm.overrides, "vocab_size": 50}
  from l2s_jax import build

  module = build.group_module(small.slm, "slm")
  hf.save(
    module,
    build.group_params(small.slm, module, rng=jax.random.PRNGKey(0)),
    str(tmp_path / "t5_50"),
  )
  bad = c.copy_and_resolve_references()
  bad.llm.path = str(tmp_path / "t5_50")
  with pytest.raises(
    ValueError, match="llm.path .*t5_50.* has a vocabulary of 50, but the tokenizer has 201 ids"
  ):
    assemble.for_training(bad, workdir)


@pytest.mark.slow
def test_the_two_tokenizer_hybrid_beats_its_slm_alone(tmp_path):
  """The paper's workflow at a test budget (about 10 minutes on 2 cores): a T5 trained on the
  Unigram tokenizer, exported with it; GPT-2 on the byte-level BPE, alone and as LLM-to-SLM
  on that T5 (same steps, batch and schedule). The hybrid's loss falls and its BLEU is higher."""
  steps = 1500

  def budget(c):
    c.train.steps, c.train.checkpoint_every, c.train.log_every = steps, steps, 100
    c.data.synthetic.num_train, c.data.synthetic.num_validation = 20000, 200
    c.decode.batch_size, c.decode.max_new_tokens = 40, 64
    return c

  llm = budget(config("llm"))
  train_lib.train_and_evaluate(llm, str(tmp_path / "llm"))
  assemble.export_workdir(llm, str(tmp_path / "llm"), "transformers", str(tmp_path / "llm_hf"))
  scores = {}
  for kind in ("plain", "hybrid"):
    c = budget(config("gpt2"))
    c.model.kind = kind
    if kind == "hybrid":
      c.llm.path = c.data.llm_tokenizer = str(tmp_path / "llm_hf" / "model")
    workdir = str(tmp_path / kind)
    train_lib.train_and_evaluate(c, workdir)
    losses = [
      r["loss"] for r in read_jsonl(os.path.join(workdir, "train_metrics.jsonl")) if "loss" in r
    ]
    assert len(losses) == steps // 100 and np.mean(losses[-3:]) < losses[0] - 1.0
    scores[kind] = eval_lib.evaluate(c, workdir)["metrics"]["bleu"]
  print(scores)
  assert scores["hybrid"] > scores["plain"] + 5, scores
