"""eval.py's library: metrics equal the reference CLIs, exact example counts, exports."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import torch_reference as ref
from helpers import chi_square_pvalue, load_config
from l2s_jax import assemble, eval_lib, export, methods, metrics, sharding, train_lib
from l2s_jax.decoding import generate
from l2s_jax.models.adapters import adapter_for


def _tiny_config(steps=6):
  c = load_config("tiny.py")
  c.train.steps = steps
  c.train.checkpoint_every = steps
  c.train.eval_every = 0
  c.data.synthetic.num_validation = 13  # not a multiple of the batch size
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
  base = report["predictions_file"][: -len(".predictions.jsonl")]
  cli = subprocess.run(
    [
      sys.executable,
      "-m",
      "sacrebleu",
      base + ".ref.txt",
      "-i",
      base + ".hyp.txt",
      "-m",
      "bleu",
      "chrf",
      "-w",
      "4",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  bleu, chrf = json.loads(cli.stdout)
  assert 20 < report["metrics"]["bleu"] < 95
  assert report["metrics"]["bleu"] == pytest.approx(bleu["score"], abs=1e-4)
  assert report["metrics"]["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
  assert report["metrics"]["bleu_signature"] == bleu["signature"]


def test_rouge_equals_rouge_score_cli(tmp_path):
  refs = [
    "the cat sat on the mat.\nit was happy.",
    "stocks rallied on monday after gains",
    "a new study finds coffee is good",
    "rain is expected across the north",
  ]
  hyps = [
    "the cat sat on a mat.\nit was glad.",
    "stocks fell on monday",
    "coffee is good says a study",
    "sunny skies across the south",
  ]
  ours = metrics.summarization_scores(hyps, refs)
  (tmp_path / "t.txt").write_text("".join(r.replace("\n", " ") + "\n" for r in refs))
  (tmp_path / "p.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hyps))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "rouge_score.rouge",
      f"--target_filepattern={tmp_path / 't.txt'}",
      f"--prediction_filepattern={tmp_path / 'p.txt'}",
      f"--output_filename={tmp_path / 'out.csv'}",
      "--use_stemmer=true",
      "--aggregate=false",
      "--rouge_types=rouge1,rouge2,rougeL",
    ],
    check=True,
    capture_output=True,
  )
  import csv

  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert len(rows) == 4
  for kind in ("rouge1", "rouge2", "rougeL"):
    f = [float(r[f"{kind}-F"]) for r in rows]  # printed to 6 decimals
    assert ours[kind] == pytest.approx(100 * np.mean(f), abs=1e-4), kind
  assert 0 < ours["rouge2"] < ours["rouge1"] < 100


def test_scores_exactly_n_examples(trained):
  c, workdir = trained
  report = eval_lib.evaluate(c, workdir)
  assert report["examples"] == 13
  lines = [json.loads(line) for line in open(report["predictions_file"]).read().splitlines()]
  assert sorted(line["index"] for line in lines) == list(range(13))  # each example once
  from l2s_jax.data import build_pipeline

  source = build_pipeline(
    c.data, model_kind="encoder_decoder", hybrid=False, batch_size=1, workdir=workdir
  ).source("validation")
  assert [line["reference"] for line in lines] == [
    source[line["index"]]["target"] for line in lines
  ]
  assert report["speed"]["batched"]["examples"] == 13
  saved = json.load(open(os.path.join(workdir, "eval", "validation-6.json")))
  assert saved["metrics"]["bleu"] == report["metrics"]["bleu"]


def test_exports_reload_and_generate_identically(trained, tmp_path):
  c, workdir = trained
  run = assemble.for_evaluation(c, workdir)
  model, params, pipeline, step = run.model, run.params, run.pipeline, run.step
  assert step == 6
  batch = next(pipeline.iterator("validation", shuffle=False, repeat=False))
  ids, mask = batch["inputs"], batch["inputs_mask"]
  extra = {"llm_input_ids": batch["llm_inputs"], "llm_attention_mask": batch["llm_inputs_mask"]}
  live = generate(
    model, params, ids, mask, max_new_tokens=10, eos_id=1, extra_inputs=extra, prompt_buckets=None
  )

  # 1. params export -> eval's loader -> same generations.
  trained_params = {k: v for k, v in params.items() if k != "llm"}
  export.export_params(trained_params, str(tmp_path / "params"), config=c, step=step)
  c2 = _tiny_config()
  c2.decode.params = "export:" + str(tmp_path / "params")
  params2 = assemble.for_evaluation(c2, workdir).params
  again = generate(
    model, params2, ids, mask, max_new_tokens=10, eos_id=1, extra_inputs=extra, prompt_buckets=None
  )
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(live.tokens))

  # 2. the SLM as a transformers directory -> same generations as the SLM in memory.
  export.export_transformers(model.slm, params["slm"], str(tmp_path / "hf"), config=c, step=step)
  _, slm, slm_params = export.load_transformers(str(tmp_path / "hf"))
  a = generate(slm, slm_params, ids, mask, max_new_tokens=10, eos_id=1)
  b = generate(model.slm, params["slm"], ids, mask, max_new_tokens=10, eos_id=1)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))

  # 3. the serialized hybrid generate -> same generations as the live one.
  shapes = {k: (np.shape(v), np.int32) for k, v in extra.items()}
  export.export_generate(
    model,
    params,
    str(tmp_path / "hlo"),
    batch=ids.shape[0],
    prompt_len=ids.shape[1],
    max_new_tokens=10,
    eos_id=1,
    extra_shapes=shapes,
    config=c,
    step=step,
  )
  manifest, run = export.load_generate(str(tmp_path / "hlo"))
  tokens, lengths = run(ids, mask, **extra)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(live.tokens))
  assert manifest["source_step"] == 6 and manifest["config"]["model"]["kind"] == "hybrid"


def _sharded(c):
  """The same run, evaluated on a (data 2, fsdp 2, tensor 2) mesh, both models sharded."""
  c = c.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.llm.rules = c.slm.rules = "fsdp_tensor"
  return c


def _llm_shardings_while_decoding(monkeypatch):
  """Wraps the decoding front that eval calls to record the frozen LLM params' shardings."""
  seen, real = [], methods.decode

  def spy(spec, models, params, *a, **k):
    kernel = params[0]["llm"]["encoder"]["layers_0"]["mlp"]["wi_0"]
    seen.append(
      {
        "spec": kernel.sharding.spec,
        "shards": {tuple(s.data.shape) for s in kernel.addressable_shards},
        "mesh": k.get("mesh"),
      }
    )
    return real(spec, models, params, *a, **k)

  monkeypatch.setattr(methods, "decode", spy)
  return seen


@pytest.mark.parametrize("num_beams", [1, 3])
def test_sharded_evaluation_equals_one_device(trained, monkeypatch, num_beams, tmp_path):
  """eval on 8 devices (data 2, fsdp 2, tensor 2; the frozen LLM sharded over fsdp x tensor
  while it decodes) writes the predictions and metrics of eval on one device."""
  c, workdir = trained
  c = c.copy_and_resolve_references()
  c.decode.num_beams = num_beams
  c.decode.method = "beam" if num_beams > 1 else "greedy"
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  single = eval_lib.evaluate(c, workdir, mesh=one)
  single_lines = open(single["predictions_file"]).read()
  seen = _llm_shardings_while_decoding(monkeypatch)
  sharded = eval_lib.evaluate(_sharded(c), workdir)
  assert open(sharded["predictions_file"]).read() == single_lines
  assert sharded["metrics"] == single["metrics"] and sharded["examples"] == 13
  assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # The LLM's FFN kernel [D=64, F=128] sits on each device as one [32, 64] block.
  assert seen and all(s["spec"] == jax.sharding.PartitionSpec("fsdp", "tensor") for s in seen)
  assert all(s["shards"] == {(32, 64)} and s["mesh"].size == 8 for s in seen)
  llm_bytes = sharded["param_bytes_per_device"]["frozen_llm"]
  assert llm_bytes["devices"] == 8 and llm_bytes["max"] <= 0.5 * llm_bytes["unsharded"]
  assert single["param_bytes_per_device"]["frozen_llm"]["max"] == llm_bytes["unsharded"]


def test_bad_evaluation_settings_are_named(trained, tmp_path):
  c, workdir = trained
  bad = _sharded(c)
  bad.mesh.data = 3
  with pytest.raises(
    ValueError,
    match=r"config.mesh: mesh shape .*'data': 3.* has 12 devices, "
    "but there are 8",
  ):
    eval_lib.evaluate(bad, workdir)
  bad = _sharded(c)
  bad.decode.batch_size = 6
  with pytest.raises(
    ValueError,
    match=r"decode.batch_size=6 is not a multiple of the "
    r"data-parallel size 4",
  ):
    eval_lib.evaluate(bad, workdir)
  # A checkpoint restored params-only into another model: the param and both shapes named.
  other = c.copy_and_resolve_references()
  other.slm.overrides.d_ff = 48
  with pytest.raises(
    ValueError,
    match=r"slm/decoder/layers_0/mlp/wi.*has shape \(32, 64\) in "
    r"checkpoint step 6 but \(32, 48\) in the config's model",
  ):
    eval_lib.evaluate(other, workdir)
  missing = c.copy_and_resolve_references()
  missing.decode.checkpoint_step = 5
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 5 .*steps there: \\[6\\]"):
    eval_lib.evaluate(missing, workdir)
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    eval_lib.evaluate(c, str(tmp_path / "empty"))


def test_evaluation_never_builds_an_optimizer(trained, monkeypatch):
  """Params-only restore: config.opt is irrelevant, no optimizer is made."""
  from l2s_jax import optimizer

  c, workdir = trained
  c = c.copy_and_resolve_references()
  c.opt.lr_multipliers = (("no-such-param", 2.0),)  # would fail if an optimizer were built
  c.opt.learning_rate = 123.0

  def refuse(*a, **k):
    raise AssertionError("evaluation built an optimizer")

  monkeypatch.setattr(optimizer, "make_optimizer", refuse)
  monkeypatch.setattr(train_lib, "make_optimizer", refuse)  # the name training calls
  report = eval_lib.evaluate(c, workdir)
  assert report["examples"] == 13 and report["step"] == 6


def test_int8_weights_are_a_config_setting(trained):
  """decode.weights='int8': every weight matrix the decoder multiplies by is int8 (qwix), the
  results go to their own file, and the predictions are those of the quantized params (their
  numerics against transformers: tests/test_quantize.py)."""
  from l2s_jax import quantize

  c, workdir = trained
  q = c.copy_and_resolve_references()
  q.decode.weights = "int8"
  report = eval_lib.evaluate(q, workdir)
  assert report["decode"]["weights"] == "int8"
  assert os.path.isfile(os.path.join(workdir, "eval", "validation-6.int8.json"))
  run = assemble.for_evaluation(c, workdir)
  ids, mask, _ = eval_lib.prompt_batch(run.pipeline, "validation", 13)
  tok = run.pipeline.tokenizer
  out = generate(
    run.compute_model,
    quantize.quantize_weights(run.params, "int8"),
    ids,
    mask,
    max_new_tokens=c.decode.max_new_tokens,
    eos_id=tok.eos_id,
    extra_inputs=adapter_for(run.model).partner_inputs(ids, mask),
  )  # a hybrid's LLM prompt
  lines = sorted(
    (json.loads(line) for line in open(report["predictions_file"])), key=lambda line: line["index"]
  )
  assert [line["hypothesis"] for line in lines] == [
    eval_lib.hypothesis_text(run.pipeline, t, n, tok.eos_id)
    for t, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))
  ]
  bad = c.copy_and_resolve_references()
  bad.decode.weights = "int4"
  with pytest.raises(ValueError, match="decode.weights 'int4': use one of stored, int8"):
    eval_lib.evaluate(bad, workdir)


# --- decode.method=sample --------------------------------------------------------------------


def _sampling_job(tmp_path, rows):
  """A tiny plain T5 (transformers, random; about 25 likely first tokens) over the synthetic
  task's tokenizer, and a JSONL of its first validation prompt `rows` times: (config, workdir,
  torch model, the encoder ids evaluation feeds for that prompt)."""
  from l2s_jax.data import build_pipeline

  c = load_config("tiny.py")
  c.model.kind = "plain"
  workdir = str(tmp_path / "run")
  synthetic = build_pipeline(
    c.data, model_kind="encoder_decoder", hybrid=False, batch_size=1, workdir=workdir
  )  # writes WORKDIR/tokenizer
  prompt = synthetic.source("validation")[0]["prompt"]
  torch_model = ref.t5(
    vocab_size=synthetic.vocab_size, num_layers=1, num_decoder_layers=1, initializer_factor=1.5
  )
  torch_model.save_pretrained(tmp_path / "t5")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text((json.dumps({"prompt": prompt}) + "\n") * rows)
  c.slm.preset, c.slm.overrides, c.slm.path = "", {}, str(tmp_path / "t5")
  c.data.source, c.data.jsonl_validation = "jsonl", str(prompts)
  c.data.tokenizer = os.path.join(workdir, "tokenizer")
  c.decode.params, c.decode.batch_size, c.decode.max_new_tokens = "initial", 64, 1
  jsonl = build_pipeline(
    c.data, model_kind="encoder_decoder", hybrid=False, batch_size=1, workdir=workdir
  )
  ids, mask, _ = eval_lib.prompt_batch(jsonl, "validation", 1)
  return c, workdir, torch_model, (ids, mask)


# (temperature, top_k, wrong (temperature, top_k) for the negative controls): the temperature
# ignored; the top-k ignored, or another temperature.
@pytest.mark.parametrize(
  "temperature,top_k,wrong", [(0.7, 0, [(1.0, 0)]), (1.3, 12, [(1.3, 0), (0.7, 12)])]
)
def test_sampling_from_config_draws_the_models_distribution(
  tmp_path, monkeypatch, temperature, top_k, wrong
):
  """decode.method=sample through eval.py's library, one prompt over 640 rows, one new token:
  the first tokens drawn follow the model's exact distribution (transformers' logits at the
  first decoder position, divided by the temperature, top-k kept, softmax: by hand) by a
  chi-squared test; the same draws are rejected against the distribution with the temperature
  or the top-k ignored, or at another temperature (negative controls)."""
  rows = 640
  c, workdir, torch_model, (ids, mask) = _sampling_job(tmp_path, rows)
  c.decode.method, c.decode.temperature, c.decode.top_k = "sample", temperature, top_k
  first = []
  real = eval_lib.hypothesis_text

  def recording(pipeline, tokens_row, length, eos):
    first.append(int(tokens_row[0]))
    return real(pipeline, tokens_row, length, eos)

  monkeypatch.setattr(eval_lib, "hypothesis_text", recording)
  report = eval_lib.evaluate(c, workdir)
  assert report["examples"] == rows and len(first) == rows
  assert len(open(report["predictions_file"]).readlines()) == rows
  # The first decoder position reads the start id (0), the encoder the prompt as evaluated.
  logits = ref.torch_logits(
    torch_model, input_ids=ids, attention_mask=mask, decoder_input_ids=np.zeros((1, 1), np.int64)
  )[0, 0]
  exact = ref.softmax_sampling_distribution(logits, temperature, top_k)
  assert chi_square_pvalue(first, exact) > 1e-3
  for other in wrong:
    assert chi_square_pvalue(first, ref.softmax_sampling_distribution(logits, *other)) < 1e-6
