"""Loss, optimizer and the jitted train step.

The frozen LLM's params are a separate argument of the loss: `jax.grad`
differentiates only the trainable tree {projector, slm} (or a plain model's
params), and the optimizer state mirrors only that tree.
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from l2s_jax import config_schema
from l2s_jax.checkpoint import path_name
from l2s_jax.models import LLMToSLM, T5

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array        # int32 []
  params: Any        # trainable params only
  opt_state: Any     # mirrors `params` (the frozen LLM has none)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = opt.warmup_steps if opt.warmup_steps >= 0 else int(round(opt.warmup_fraction * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  peak, end = opt.learning_rate, opt.learning_rate * opt.end_lr_fraction
  decay = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=opt.end_lr_fraction)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """AdamW behind optional global-norm clipping, then per-path learning-rate factors
  (opt.lr_multipliers); returns (tx, schedule)."""
  schedule = learning_rate_schedule(opt, total_steps)
  parts = []
  if opt.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay))
  if rules := config_schema.lr_multipliers(opt):
    parts.append(scale_by_path(rules))
  return optax.chain(*parts), schedule


def scale_by_path(rules: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first regex its param path matches
  (after AdamW: a per-param learning rate, weight decay included); a regex that
  matches no param is an error naming it."""
  compiled = [(re.compile(p), f) for p, f in rules.items()]

  def factor(path) -> float:
    name = path_name(path)
    return next((f for r, f in compiled if r.search(name)), 1.0)

  def init(params):
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for r, _ in compiled:      # (optax.tree_map_params inits on a tree without leaves)
      if names and not any(r.search(n) for n in names):
        raise ValueError(f"opt.lr_multipliers: {r.pattern!r} matches no param "
                         f"(e.g. {names[:3]})")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

  return optax.GradientTransformation(init, update)


def shift_right(targets_BT: Array, start_id: int) -> Array:
  """Decoder inputs of a T5: the start token, then the targets but the last."""
  start = jnp.full_like(targets_BT[:, :1], start_id)
  return jnp.concatenate([start, targets_BT[:, :-1]], axis=1)


def _slm(model):
  return model.slm if isinstance(model, LLMToSLM) else model


def logits_and_targets(model, variables, batch: dict) -> tuple[Array, Array, Array]:
  """(logits [B, T, V], targets [B, T], weights [B, T]) for any model kind."""
  slm = _slm(model)
  hybrid = isinstance(model, LLMToSLM)
  if isinstance(slm, T5):
    targets, weights = batch["targets"], batch["targets_mask"]
    dec_in = shift_right(targets, slm.config.decoder_start_token_id)
    kw = {}
    if hybrid:
      kw = dict(llm_input_ids=batch.get("llm_inputs", batch["inputs"]),
                llm_attention_mask=batch.get("llm_inputs_mask", batch["inputs_mask"]),
                overlap=batch.get("overlap"))
    logits = model.apply(variables, batch["inputs"], batch["inputs_mask"], dec_in, **kw)
    return logits, targets, weights
  tokens, mask = batch["tokens"], batch["tokens_mask"]
  if hybrid:
    t = tokens.shape[1]
    prompt_mask = (jnp.arange(t)[None, :] < batch["prompt_lengths"][:, None]).astype(jnp.int32)
    llm_ids = batch.get("llm_inputs", tokens * prompt_mask)
    llm_mask = batch.get("llm_inputs_mask", prompt_mask)
    logits = model.apply(variables, tokens, mask, llm_input_ids=llm_ids,
                         llm_attention_mask=llm_mask, overlap=batch.get("overlap"),
                         prompt_mask=prompt_mask)
  else:
    logits = model.apply(variables, tokens, mask)
  # Position t predicts token t + 1; the loss covers the response only.
  return logits[:, :-1], tokens[:, 1:], batch["loss_mask"][:, 1:]


def token_losses(logits: Array, targets: Array, label_smoothing: float) -> Array:
  """Per-token cross-entropy [B, T] (float32 or wider), with optional label smoothing."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  return nll


def loss_sums(trainable, frozen, batch, *, model, label_smoothing: float):
  """(sum of token losses, (number of loss tokens, sum of plain NLL)) of one micro-batch."""
  params = {**trainable, "llm": frozen} if isinstance(model, LLMToSLM) else trainable
  logits, targets, weights = logits_and_targets(model, {"params": params}, batch)
  w = weights.astype(jnp.promote_types(logits.dtype, jnp.float32))
  losses = token_losses(logits, targets, label_smoothing)
  nll = token_losses(logits, targets, 0.0) if label_smoothing else losses
  return jnp.sum(losses * w), (jnp.sum(w), jnp.sum(nll * w))


def _split_micro(batch: dict, n: int) -> dict:
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def train_step(state: TrainState, frozen, batch: dict, *, model, tx, grad_accum: int,
               label_smoothing: float, schedule) -> tuple[TrainState, dict]:
  """One optimizer step over `grad_accum` micro-batches of `batch`.

  Gradients of the token-summed loss are accumulated and divided by the
  total number of loss tokens, so accumulation equals one big batch.
  """
  grad_fn = jax.value_and_grad(
      lambda p, f, b: loss_sums(p, f, b, model=model, label_smoothing=label_smoothing),
      has_aux=True)

  def micro(carry, mb):
    g_acc, loss_acc, tok_acc, nll_acc = carry
    (loss_sum, (tok, nll)), g = grad_fn(state.params, frozen, mb)
    return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss_sum, tok_acc + tok,
            nll_acc + nll), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  acc = jnp.promote_types(jax.tree.leaves(state.params)[0].dtype, jnp.float32)
  init = (zeros, jnp.zeros((), acc), jnp.zeros((), acc), jnp.zeros((), acc))
  if grad_accum == 1:
    (grads, loss_sum, tokens, nll), _ = micro(init, batch)
  else:
    (grads, loss_sum, tokens, nll), _ = jax.lax.scan(micro, init, _split_micro(batch, grad_accum))
  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "nll": nll / denom, "tokens": tokens,
             "grad_norm": optax.tree_utils.tree_norm(grads), "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen, batch, *, model) -> dict:
  """Summed NLL and token count of a batch (for a token-weighted mean)."""
  _, (tokens, nll) = loss_sums(params, frozen, batch, model=model, label_smoothing=0.0)
  return {"nll_sum": nll, "tokens": tokens}
