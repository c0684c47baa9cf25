"""Every decoding method from config (`config.decode.method`, `config.collab`), through
eval.py's library on trained tiny models: speculative decoding gives the large model's own
output, the combiners give what the Python API gives, a hybrid on the small side follows a
step-by-step reference, sampling follows the large model's distribution, and a JSONL of
prompts alone is a generation job."""

import json
import os
import re

import jax
import numpy as np
import pytest

import torch_reference as ref
from helpers import chi_square_pvalue, load_config
from l2s_jax import assemble, eval_lib, methods, sharding, train_lib
from l2s_jax.collab.combine import Contrastive, Proxy, Router, collab_generate
from l2s_jax.config_decode import spec_from_config, validate_decode
from l2s_jax.hf import CheckpointError

N = 10


def _tiny():
  c = load_config("tiny.py")
  c.train.steps, c.train.checkpoint_every, c.train.eval_every = 8, 8, 0
  c.opt.learning_rate = 3e-3
  c.data.synthetic.num_validation = 13
  c.decode.batch_size, c.decode.max_new_tokens = 8, N
  return c


def config(kind: str, root=None):
  """llm: a plain T5 of the tiny LLM's size; slm: the tiny SLM alone; hybrid: LLM-to-SLM on
  the trained llm's encoder."""
  c = _tiny()
  if kind == "llm":
    c.model.kind = "plain"
    c.slm.preset, c.slm.overrides = c.llm.preset, c.llm.overrides
  elif kind == "slm":
    c.model.kind = "plain"
  else:
    c.llm.path = os.path.join(root, "llm", "transformers")
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("family"))
  for kind in ("llm", "slm", "hybrid"):
    train_lib.train_and_evaluate(config(kind, root), os.path.join(root, kind))
    if kind == "llm":
      assemble.export_plain(config("llm"), os.path.join(root, "llm"))
  return root


def with_method(c, method, root, **collab):
  c = c.copy_and_resolve_references()
  c.decode.method = method
  c.collab.workdir = os.path.join(root, "llm")
  for k, v in collab.items():
    node, *path = k.split("__")
    target = c.collab[node] if path else c.collab
    target[path[0] if path else node] = v
  return c


def _hyps(report):
  return [json.loads(line)["hypothesis"] for line in open(report["predictions_file"])]


def one_device():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def eight_devices(c):
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.llm.rules = c.slm.rules = "fsdp_tensor"
  return c


def batch1_hyps(c, workdir, mesh=None):
  run = assemble.for_evaluation(c, workdir, mesh, batch_size=1 if mesh is not None else None)
  out = eval_lib.decode_split(
    methods.build(c, run), run.pipeline, "validation", batch_size=1, max_examples=5, desc="batch 1"
  )
  return [r["hypothesis"] for r in out["rows"]]


@pytest.mark.parametrize("draft", ["slm", "hybrid"])
def test_speculative_eval_gives_the_large_models_own_output(trained, draft):
  """method=speculative (System 1 drafts, collab verifies) writes the predictions of the large
  model evaluated alone, greedy: batched and at batch 1, on 1 device and on 8."""
  root = trained
  alone = eval_lib.evaluate(config("llm"), os.path.join(root, "llm"), mesh=one_device())
  expected = _hyps(alone)
  assert len(set(expected)) > 1
  c = with_method(config(draft, root), "speculative", root, gamma=3)
  workdir = os.path.join(root, draft)
  report = eval_lib.evaluate(c, workdir, mesh=one_device())
  assert _hyps(report) == expected
  assert report["metrics"] == alone["metrics"]
  stats = report["speed"]["batched"]["method_stats"]
  assert 0.0 < stats["acceptance_rate"] <= 1.0 and len(stats["acceptance_by_position"]) == 3
  assert stats["tokens_per_large_call"] == pytest.approx(
    stats["generated_tokens"] / stats["large_calls"]
  )
  assert report["decode"]["collab"] == {
    "workdir": os.path.join(root, "llm"),
    "gamma": 3,
    "adaptive": False,
  }
  assert batch1_hyps(c, workdir, one_device()) == expected[:5]
  sharded = eval_lib.evaluate(eight_devices(c.copy_and_resolve_references()), workdir)
  assert _hyps(sharded) == expected and sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert batch1_hyps(eight_devices(c.copy_and_resolve_references()), workdir) == expected[:5]


def _prompts(c, workdir):
  run = assemble.for_evaluation(c, workdir, one_device())
  ids, mask, _ = eval_lib.prompt_batch(run.pipeline, "validation", 13)
  return run, ids, mask


def _texts(run, out):
  return [
    eval_lib.hypothesis_text(
      run.pipeline, out.tokens[r], int(out.lengths[r]), run.pipeline.tokenizer.eos_id
    )
    for r in range(len(out.lengths))
  ]


def _median_top1(c, workdir):
  """The median probability of the SLM's greedy token along its own outputs: a top1 router
  threshold that sends about half the steps to the LLM."""
  from l2s_jax.decoding import generate

  run, ids, mask = _prompts(c, workdir)
  out = generate(
    run.compute_model,
    run.params,
    ids,
    mask,
    max_new_tokens=N,
    eos_id=run.pipeline.tokenizer.eos_id,
    return_logprobs=True,
  )
  valid = np.arange(N)[None, :] < out.lengths[:, None]
  return round(float(np.median(np.exp(out.logprobs[valid]))), 4)


@pytest.mark.parametrize(
  "method, draft", [("contrastive", "slm"), ("routed", "slm"), ("proxy", "hybrid")]
)
def test_combiners_from_config_equal_the_python_api(trained, method, draft):
  """eval.py's predictions with contrastive / routed / proxy decoding equal collab_generate
  called by hand on the same prompts with the same models (a hybrid on the small side of proxy,
  the SLM alone as its base)."""
  root = trained
  extra, combiner = {}, Contrastive(0.1, 0.5, "fsgen")
  if method == "routed":
    t = _median_top1(config(draft), os.path.join(root, draft))
    extra, combiner = {"router_threshold": t}, Router("top1", t)
  if method == "proxy":
    extra, combiner = {"proxy_alpha": 1.5, "base__workdir": os.path.join(root, "slm")}, Proxy(1.5)
  c = with_method(config(draft, root), method, root, **extra)
  report = eval_lib.evaluate(c, os.path.join(root, draft), mesh=one_device())
  run, ids, mask = _prompts(c, os.path.join(root, draft))
  llm, llm_params = assemble.load_trained(config("llm"), os.path.join(root, "llm"), one_device())
  models, params, extras = [llm, run.compute_model], [llm_params, run.params], [{}, {}]
  if draft == "hybrid":
    extras[1] = {"llm_input_ids": ids, "llm_attention_mask": mask}
  if method == "proxy":
    base, base_params = assemble.load_trained(
      config("slm"), os.path.join(root, "slm"), one_device()
    )
    models, params, extras = models + [base], params + [base_params], extras + [{}]
  out = collab_generate(
    models,
    params,
    ids,
    mask,
    combiner=combiner,
    max_new_tokens=N,
    eos_id=run.pipeline.tokenizer.eos_id,
    extra_inputs=extras,
    prompt_buckets=c.data.prompt_buckets,
  )
  assert _hyps(report) == _texts(run, out)
  stats = report["speed"]["batched"]["method_stats"]
  assert stats["collaboration_frequency"] == pytest.approx(
    float((out.tokens != out.trace["small_choice"])[out.valid()].mean())
  )
  assert stats["large_call_rate"] == pytest.approx(out.summary()["large_call_rate"])
  if method == "routed":
    # eval.py runs System 2 only where a row fires (routed_generate); collab_generate runs it
    # at every step: the same tokens.
    assert 0.0 < stats["large_call_rate"] < 1.0
    assert stats["large_call_rate"] <= stats["batch_call_rate"] <= 1.0
    # The large model reads every row of a batch when it runs, finished and padding rows too
    # (the batch's work), so the bound is the batches' rows x steps over the tokens generated.
    bs = c.decode.batch_size
    rows = bs * -(-len(out.lengths) // bs)
    bound = rows * N / stats["generated_tokens"]
    assert 0.0 < stats["large_tokens_read_per_token"] <= bound


def test_a_hybrid_on_the_small_side_follows_a_step_by_step_reference(trained):
  """Contrastive decoding with the hybrid as System 1, from eval.py, equals a loop that runs
  both models' full forwards (no cache) on the text so far and combines their log-probs in
  NumPy, token by token."""
  root = trained
  c = with_method(
    config("hybrid", root), "contrastive", root, contrastive_form="li", contrastive_beta=0.3
  )
  report = eval_lib.evaluate(c, os.path.join(root, "hybrid"), mesh=one_device())
  run, ids, mask = _prompts(c, os.path.join(root, "hybrid"))
  llm, llm_params = assemble.load_trained(config("llm"), os.path.join(root, "llm"), one_device())
  hybrid, params = run.compute_model, run.params
  eos, start = run.pipeline.tokenizer.eos_id, hybrid.slm.config.decoder_start_token_id
  forward_l = jax.jit(lambda p, dec: llm.apply({"params": p}, ids, mask, dec))
  forward_s = jax.jit(
    lambda p, dec: hybrid.apply(
      {"params": p}, ids, mask, dec, llm_input_ids=ids, llm_attention_mask=mask
    )
  )
  b = ids.shape[0]
  dec = np.full((b, N), start, np.int32)  # fixed width: the decoder is causal
  out = np.zeros((b, N), np.int32)
  done = np.zeros(b, bool)
  for t in range(N):
    lp_l = np.asarray(jax.nn.log_softmax(forward_l(llm_params, dec)[:, t], -1), np.float64)
    lp_s = np.asarray(jax.nn.log_softmax(forward_s(params, dec)[:, t], -1), np.float64)
    plausible = lp_l >= np.log(0.1) + lp_l.max(-1, keepdims=True)
    token = np.where(plausible, lp_l - 0.3 * lp_s, -np.inf).argmax(-1)
    out[:, t] = np.where(done, 0, token)
    done |= token == eos
    if t + 1 < N:
      dec[:, t + 1] = token
  lengths = np.where((out == eos).any(1), (out == eos).argmax(1) + 1, N)
  texts = [eval_lib.hypothesis_text(run.pipeline, out[r], int(lengths[r]), eos) for r in range(b)]
  assert _hyps(report) == texts
  assert len(set(texts)) > 1


def test_a_jsonl_of_prompts_alone_is_a_generation_job(trained, tmp_path):
  """eval.py on a JSONL file without targets writes predictions (the same as on the task's own
  prompts) and statistics, and no metric."""
  root = trained
  workdir = os.path.join(root, "slm")
  c = config("slm")
  scored = eval_lib.evaluate(c, workdir, mesh=one_device())
  rows = [json.loads(line) for line in open(scored["predictions_file"])]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
  c.data.source, c.data.jsonl_validation = "jsonl", str(path)
  c.data.tokenizer = os.path.join(workdir, "tokenizer")
  report = eval_lib.evaluate(c, workdir, mesh=one_device())
  assert report["references"] is False and report["metrics"] == {}
  lines = [json.loads(line) for line in open(report["predictions_file"])]
  assert [line["hypothesis"] for line in lines] == [r["hypothesis"] for r in rows]
  assert all("reference" not in line for line in lines)
  assert not os.path.exists(report["predictions_file"].replace(".predictions.jsonl", ".ref.txt"))
  assert report["speed"]["batched"]["examples"] == 13
  # Training on prompts alone is refused, naming the file.
  t = c.copy_and_resolve_references()
  t.data.jsonl_train = str(path)
  with pytest.raises(ValueError, match="prompts.jsonl.*holds prompts without targets"):
    train_lib.train_and_evaluate(t, str(tmp_path / "train"))


def test_bad_decoding_settings_are_named(trained, tmp_path):
  root = trained
  base = config("slm")

  def bad(message, **fields):
    c = base.copy_and_resolve_references()
    for key, value in fields.items():
      group, name = key.split("__")
      c[group][name] = value
    with pytest.raises(ValueError, match=message):
      validate_decode(c)

  bad("decode.method 'nucleus': use one of greedy, sample", decode__method="nucleus")
  bad(
    "num_beams=4 with decode.method='speculative'",
    decode__method="speculative",
    decode__num_beams=4,
    collab__preset="t5-small",
  )
  bad("collab.gamma=0", decode__method="speculative", collab__preset="t5-small", collab__gamma=0)
  bad(
    "the svm router reads its file",
    decode__method="routed",
    collab__router="svm",
    collab__preset="t5-small",
  )
  bad(
    "the svm router reads its file",
    decode__method="routed",
    collab__router="top1",
    collab__router_svm="/x.json",
    collab__preset="t5-small",
  )
  bad(
    "collab.rollback=2.0 .BiLD. is a rule of greedy speculative",
    decode__method="routed",
    collab__preset="t5-small",
    collab__rollback=2.0,
  )
  bad(
    "collab.rollback=-1.0: a cross-entropy",
    decode__method="speculative",
    collab__preset="t5-small",
    collab__rollback=-1.0,
  )
  bad(
    "router_threshold=1.5 is a probability",
    decode__method="routed",
    collab__preset="t5-small",
    collab__router_threshold=1.5,
  )
  bad(
    "collab.router_margin 'third'",
    decode__method="routed",
    collab__router="margin",
    collab__preset="t5-small",
    collab__router_margin="third",
  )
  bad(
    r"router_threshold=0.6 is a probability for router 'margin': it must be in \[0, 0.5\]",
    decode__method="routed",
    collab__router="margin",
    collab__preset="t5-small",
    collab__router_margin="half",
    collab__router_threshold=0.6,
  )
  bad("decode.temperature=0.7 would be ignored", decode__temperature=0.7)
  bad(
    "set exactly one of collab.path, collab.preset, collab.workdir .set: none",
    decode__method="contrastive",
  )
  bad("collab.base", decode__method="proxy", collab__preset="t5-small")
  bad(
    "min_new_tokens is not offered by decode.method='speculative'",
    decode__method="speculative",
    collab__preset="t5-small",
    decode__min_new_tokens=2,
  )
  workdir = os.path.join(root, "slm")
  # System 2 whose vocabulary is not the tokenizer's: both sizes named.
  ref.t5("t5", vocab_size=97).save_pretrained(tmp_path / "t5_97")
  c = with_method(base, "speculative", root)
  c.collab.workdir, c.collab.path = "", str(tmp_path / "t5_97")
  with pytest.raises(
    ValueError, match="collab.path .*t5_97.* has a vocabulary of 97, but the tokenizer has 274 ids"
  ):
    eval_lib.evaluate(c, workdir, mesh=one_device())
  c.collab.path = str(tmp_path)  # a directory, not a checkpoint
  with pytest.raises(
    CheckpointError,
    match=re.escape(
      f"'{tmp_path}/config.json' is missing: not a transformers checkpoint directory"
    ),
  ):
    eval_lib.evaluate(c, workdir, mesh=one_device())
  c.collab.path, c.collab.workdir = "", str(tmp_path / "never_trained")
  with pytest.raises(FileNotFoundError, match="never_trained/checkpoints"):
    eval_lib.evaluate(c, workdir, mesh=one_device())
  # A decoder-only model with 16 positions cannot take prompts of up to 32 tokens.
  g = config("slm")
  g.slm.preset = "gpt2"
  g.slm.overrides = dict(n_embd=16, n_layer=1, n_head=2, n_positions=16)
  g.decode.params = "initial"
  with pytest.raises(
    ValueError, match="data.max_prompt_len=128 and decode.max_new_tokens=10 do not fit.*only 16"
  ):
    eval_lib.evaluate(g, str(tmp_path / "gpt2"), mesh=one_device())


# --- sampling through the eval path ------------------------------------------------------


def test_sampled_speculative_decoding_from_config_follows_the_large_model(tiny_pair):
  """The method eval.py builds for method=speculative, temperature 1 (collab.path = the LLM,
  slm.path = the draft) draws (x1, x2) from the LLM's own distribution, computed exactly with
  transformers; the same draws are far from the draft's distribution (negative control)."""
  (llm_torch, *large, llm_path), (slm_torch, _, _, slm_path) = tiny_pair
  c = config("slm")
  c.slm.preset, c.slm.overrides, c.slm.path = "", {}, slm_path
  c.decode.method, c.decode.temperature, c.decode.max_new_tokens = "speculative", 1.0, 3
  c.collab.path, c.collab.gamma = llm_path, 2
  validate_decode(c)
  run = assemble.initial(c, one_device())
  method = methods.Method(
    "speculative",
    c,
    spec_from_config(c),
    (large[0], run.compute_model),
    (large[1], run.params),
    1,
    None,
    0,
    run.mesh,
  )
  prompt = [2, 3, 4]
  ids = np.tile(np.asarray([prompt], np.int32), (20000, 1))
  out = method(ids, np.ones_like(ids), {}, methods.batch_rng(c, 0))
  stats = out.summary()
  assert 0.2 < stats["draft_acceptance"] < 0.8
  exact_llm = ref.exact_two_token_distribution(llm_torch, prompt, 1.0)
  exact_draft = ref.exact_two_token_distribution(slm_torch, prompt, 1.0)
  assert chi_square_pvalue(out.tokens[:, :2], exact_llm) > 1e-3
  assert chi_square_pvalue(out.tokens[:, :2], exact_draft) < 1e-6


def test_stop_ids_and_min_new_tokens_from_config(trained):
  """decode.stop_ids ends a row at the first of them (the LLM's greedy output cut there, by
  hand); decode.min_new_tokens keeps EOS out of the first tokens (the greedy output stays a
  prefix)."""
  root = trained
  workdir = os.path.join(root, "llm")
  c = config("llm")
  words = [h.split() for h in _hyps(eval_lib.evaluate(c, workdir, mesh=one_device()))]
  counts = {}
  for w in words:
    for token in w[1:]:
      counts[token] = counts.get(token, 0) + 1
  stop = max(counts, key=counts.get)  # a word many outputs hold, not first
  run = assemble.for_evaluation(c, workdir, one_device())
  stop_id = run.pipeline.tokenizer.hf.convert_tokens_to_ids(stop)
  s = c.copy_and_resolve_references()
  s.decode.stop_ids = (stop_id,)
  cut = [h.split() for h in _hyps(eval_lib.evaluate(s, workdir, mesh=one_device()))]
  expected = [w[: w.index(stop) + 1] if stop in w else w for w in words]
  assert cut == expected and cut != words
  # min_new_tokens holds the stop ids back: rows the stop id ended early run on to at least
  # that many tokens, the same as the greedy output until that stop (the method eval builds).
  run, ids, mask = _prompts(c, workdir)
  greedy = methods.build(c, run)(ids, mask, {}, methods.batch_rng(c, 0)).tokens
  s.decode.min_new_tokens = 4
  held = methods.build(s, run)(ids, mask, {}, methods.batch_rng(s, 0))
  early = 0
  for r in range(len(greedy)):
    first = list(greedy[r]).index(stop_id) if stop_id in greedy[r] else N
    if first < 3:
      early += 1
      assert held.lengths[r] >= 4
      np.testing.assert_array_equal(held.tokens[r, :first], greedy[r, :first])
  assert early > 0


def test_export_of_a_plain_workdir_is_a_transformers_directory_with_its_tokenizer(
  trained, tmp_path
):
  """assemble.export_workdir (export.py --kind transformers): weights equal to the trained
  checkpoint's, read back by hf.load, the tokenizer by transformers' AutoTokenizer."""
  from transformers import AutoTokenizer

  from l2s_jax import export

  c = config("llm")
  workdir = os.path.join(trained, "llm")
  out = str(tmp_path / "llm_hf")
  manifest = assemble.export_workdir(c, workdir, "transformers", out)
  assert manifest["source_step"] == 8 and manifest["tokenizer"] is True
  _, _, params = export.load_transformers(out)
  _, trained_params = assemble.load_trained(c, workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
  run = assemble.for_evaluation(c, workdir)
  text = "the quick test"
  assert tok(text, add_special_tokens=False)["input_ids"] == run.pipeline.tokenizer.encode(text)[0]
  with pytest.raises(ValueError, match="already exists; pass --overwrite"):
    assemble.export_workdir(c, workdir, "transformers", out)
  with pytest.raises(ValueError, match="a hybrid's SLM reads its LLM's states"):
    assemble.export_workdir(
      config("hybrid", trained),
      os.path.join(trained, "hybrid"),
      "transformers",
      str(tmp_path / "h"),
    )
