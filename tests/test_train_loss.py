"""The training loss (train_step.loss_sums on a batch, summed loss / loss tokens) is
transformers' own loss with `labels=`: the mean token cross-entropy over the labels that are
not -100. T5: the labels are the targets (padding -100) and the decoder reads them shifted
right; GPT-2: the labels are the tokens (prompt and padding -100) and transformers shifts them
itself (position t predicts token t + 1)."""

import jax
import numpy as np
import pytest
import torch

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.models import layers
from l2s_jax.models.causal_lm import DecoderOnlyLM
from l2s_jax.train_step import loss_sums

TOL = 1e-5


def _ours(model, params, batch) -> float:
  loss = jax.jit(lambda p, b: loss_sums(p, {}, b, model=model, label_smoothing=0.0))
  total, (tokens, _) = loss(params, batch)
  return float(total) / float(tokens)


def _theirs(torch_model, **inputs) -> float:
  with torch.no_grad():
    out = torch_model(**{k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in inputs.items()})
  return float(out.loss)


def _shifted(labels):
  """The labels one position early: an off-by-one mistake."""
  return np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], -100)], axis=1)


def _load(torch_model, path):
  torch_model.save_pretrained(path)
  return hf.load(str(path))


def test_t5_loss_equals_transformers(tmp_path):
  torch_model = ref.t5()
  model, params = _load(torch_model, tmp_path)
  ids, mask = ref.padded_batch(0, 4, 11, 97, right_pad=[(1, 4), (3, 6)])
  targets, targets_mask = ref.padded_batch(1, 4, 9, 97, right_pad=[(0, 2), (2, 5)])
  batch = {"inputs": ids, "inputs_mask": mask, "targets": targets, "targets_mask": targets_mask}
  labels = np.where(targets_mask == 1, targets, -100)
  ours = _ours(model, params, batch)
  theirs = _theirs(torch_model, input_ids=ids, attention_mask=mask, labels=labels)
  assert ours == pytest.approx(theirs, abs=TOL, rel=0)
  # Negative controls: labels one position off, or padding scored as label 0, differ.
  off_by_one = _theirs(torch_model, input_ids=ids, attention_mask=mask, labels=_shifted(labels))
  padding_scored = _theirs(torch_model, input_ids=ids, attention_mask=mask, labels=targets)
  assert abs(ours - off_by_one) > 1e-2 and abs(ours - padding_scored) > 1e-2


def test_gpt2_loss_equals_transformers(tmp_path):
  torch_model = ref.gpt2()
  model, params = _load(torch_model, tmp_path)
  prompt_lengths = np.asarray([4, 6, 3, 5], np.int32)
  tokens, tokens_mask = ref.padded_batch(2, 4, 14, 97, right_pad=[(1, 3), (2, 6)])
  # The loss covers the response: the tokens after the prompt, padding excluded.
  loss_mask = tokens_mask * (np.arange(14)[None, :] >= prompt_lengths[:, None])
  batch = {
    "tokens": tokens,
    "tokens_mask": tokens_mask,
    "loss_mask": loss_mask.astype(np.int32),
    "prompt_lengths": prompt_lengths,
  }
  labels = np.where(loss_mask == 1, tokens, -100)
  ours = _ours(model, params, batch)
  theirs = _theirs(torch_model, input_ids=tokens, attention_mask=tokens_mask, labels=labels)
  assert ours == pytest.approx(theirs, abs=TOL, rel=0)
  # Negative controls: labels shifted once more (position t scored on token t + 2), or the
  # prompt scored too, give other losses.
  off_by_one = _theirs(
    torch_model, input_ids=tokens, attention_mask=tokens_mask, labels=_shifted(labels)
  )
  prompt_scored = _theirs(
    torch_model,
    input_ids=tokens,
    attention_mask=tokens_mask,
    labels=np.where(tokens_mask == 1, tokens, -100),
  )
  assert abs(ours - off_by_one) > 1e-2 and abs(ours - prompt_scored) > 1e-2


def _torch_grads(torch_model, inputs) -> dict[str, np.ndarray]:
  """d(mean token loss)/d(param) from transformers, by parameter name."""
  torch_model.zero_grad()
  out = torch_model(**{k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in inputs.items()})
  out.loss.backward()
  return {k: p.grad.numpy() for k, p in torch_model.named_parameters() if p.grad is not None}


def _our_grads(model, params, batch) -> dict[str, np.ndarray]:
  """Our gradient of the same mean, as transformers' tensors (the save path's names)."""

  def mean(p):
    total, (tokens, _) = loss_sums(p, {}, batch, model=model, label_smoothing=0.0)
    return total / tokens

  # The backward pass recomputes the blocks (a remat primitive), or the test checks nothing.
  # (Attention over more than 2 x QUERY_BLOCK positions recomputes its blocks in any case.)
  jaxpr = str(jax.make_jaxpr(jax.grad(mean))(params))
  rematerialized = "remat" in jaxpr or "checkpoint" in jaxpr
  width = max(v.shape[1] for v in batch.values() if np.ndim(v) == 2)
  assert rematerialized == model.config.remat or width > 2 * layers.QUERY_BLOCK
  if model.config.remat and isinstance(model, DecoderOnlyLM):
    # A decoder-only model's rematerialized forward scans its stacked layers.
    assert f"length={model.cache_shape()[0]}" in jaxpr
  return hf.to_tensors(model, jax.jit(jax.grad(mean))(params))


def _decoder_only_batch(tokens, tokens_mask, prompt_lengths) -> tuple[dict, dict]:
  """(our batch, transformers' inputs with labels) of prompts then responses: the loss
  covers the response tokens."""
  prompt_lengths = np.asarray(prompt_lengths, np.int32)
  loss_mask = tokens_mask * (np.arange(tokens.shape[1])[None, :] >= prompt_lengths[:, None])
  batch = {"tokens": tokens, "tokens_mask": tokens_mask,
           "loss_mask": loss_mask.astype(np.int32), "prompt_lengths": prompt_lengths}  # fmt: skip
  inputs = {"input_ids": tokens, "attention_mask": tokens_mask,
            "labels": np.where(loss_mask == 1, tokens, -100)}  # fmt: skip
  return batch, inputs


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_remat_gradients_equal_transformers(family, tmp_path):
  """`train.remat` (every block recomputed; GPT-2's and Llama's scanned) changes what the
  backward pass keeps, not
  the gradient: each param's gradient equals transformers' (loss.backward())."""
  from l2s_jax import build

  torch_model = getattr(ref, family)()
  model, params = _load(torch_model, tmp_path)
  remat = build.with_remat(model)
  assert remat.config.remat and not model.config.remat
  if family == "t5":
    ids, mask = ref.padded_batch(0, 3, 9, 97, right_pad=[(1, 4)])
    targets, targets_mask = ref.padded_batch(1, 3, 7, 97, right_pad=[(2, 3)])
    batch = {"inputs": ids, "inputs_mask": mask, "targets": targets, "targets_mask": targets_mask}
    labels = np.where(targets_mask == 1, targets, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
  else:
    tokens, tokens_mask = ref.padded_batch(2, 3, 10, 97, right_pad=[(1, 3)])
    batch, inputs = _decoder_only_batch(tokens, tokens_mask, [3, 4, 2])
  theirs = _torch_grads(torch_model, inputs)
  ours = _our_grads(remat, params, batch)
  # Every layer's weights are compared (tied copies are one torch parameter).
  layer_keys = [k for k in theirs if ".h." in k or ".layers." in k or ".block." in k]
  assert layer_keys and all(k in ours for k in layer_keys), sorted(set(layer_keys) - set(ours))
  for k in (k for k in theirs if k in ours):
    np.testing.assert_allclose(ours[k], theirs[k], atol=2e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("remat", [False, True])
def test_train_remat_reaches_the_model_the_train_step_differentiates(remat):
  """`train.remat` in a config: the train step's model (`Assembly.train_model`, what
  `train_lib.jit_train_step` differentiates) is rematerialized; a hybrid's SLM only."""
  import os
  import sys

  from l2s_jax import assemble, sharding

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import tiny

  config = tiny.get_config()
  config.train.remat = remat
  run = assemble.abstract(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  assert run.train_model.slm.config.remat is remat
  assert not run.compute_model.slm.config.remat and not run.train_model.llm.config.remat


@pytest.mark.parametrize("remat", [False, True])
def test_long_sequence_gradients_equal_transformers(remat, tmp_path):
  """300 positions: attention runs in query blocks (`layers.QUERY_BLOCK`), each block's
  logits recomputed in the backward pass instead of saved; with `remat` the layers are
  scanned too. Every gradient equals transformers' (a Llama with a 512-position rope)."""
  from l2s_jax import build

  torch_model = ref.llama(max_position_embeddings=512)
  model, params = _load(torch_model, tmp_path)
  model = build.with_remat(model) if remat else model
  tokens, tokens_mask = ref.padded_batch(3, 2, 300, 97, right_pad=[(1, 40)])
  batch, inputs = _decoder_only_batch(tokens, tokens_mask, [5, 9])
  theirs = _torch_grads(torch_model, inputs)
  ours = _our_grads(model, params, batch)
  assert any(".layers." in k for k in theirs)
  for k in (k for k in theirs if k in ours):
    np.testing.assert_allclose(ours[k], theirs[k], atol=2e-5, rtol=1e-4, err_msg=k)


def test_a_long_sequence_gradient_keeps_no_whole_attention_matrix():
  """The gradient of a 1-layer Llama over 4096 positions, compiled for this CPU: its
  temporaries stay below a third of the one layer's float32 attention logits for all
  queries at once (4 heads x 4096 x 4096, 256 MiB; with every query block's probabilities
  saved for the backward pass they were 2.5x as many). What is left is O(T) activations
  and the [T, T] boolean mask."""
  from l2s_jax.models import llama

  cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
  model, t = llama.Llama(cfg), 4096
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
  ids = jax.ShapeDtypeStruct((1, t), np.int32)
  grad = jax.jit(jax.grad(lambda p, i: model.apply(p, i)[..., 0].sum()))
  temporaries = grad.lower(params, ids).compile().memory_analysis().temp_size_in_bytes
  assert temporaries < 4 * t * t * 4 / 3, temporaries / 2**20


def test_rematerialized_layers_add_only_their_gradients_and_inputs_to_a_step():
  """The gradient of a rematerialized Llama of 2 and of 8 layers (batch 4 x 512, hidden 256,
  FFN 1024), compiled for this CPU: each layer more adds, by hand, its float32 gradient, its
  stacked params and its saved input ([4, 512, 256] float32), 10 MiB; the step grows by less
  than 1.5x that a layer. (A Python loop of nn.remat blocks grew by 58 MiB a layer: XLA
  recomputed layers ahead of their gradients and kept their activations alive together.)"""
  from l2s_jax.models import llama

  def temporaries(n):
    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4,
                            remat=True)  # fmt: skip
    model = llama.Llama(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
    ids = jax.ShapeDtypeStruct((4, 512), np.int32)
    grad = jax.jit(jax.grad(lambda p, i: model.apply(p, i)[..., 0].sum()))
    return grad.lower(params, ids).compile().memory_analysis().temp_size_in_bytes

  layer_params = 4 * 256**2 + 3 * 256 * 1024 + 2 * 256
  per_layer = 2 * layer_params * 4 + 4 * 512 * 256 * 4
  growth = (temporaries(8) - temporaries(2)) / 6
  assert growth < 1.5 * per_layer, (growth / 2**20, per_layer / 2**20)
