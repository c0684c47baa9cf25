"""Loss and the jitted train step (the optimizer: `l2s_jax.optimizer`).

The frozen LLM's params are a separate argument of the loss: `jax.grad`
differentiates only the trainable tree {projector, slm} (or a plain model's
params), and the optimizer state mirrors only that tree.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from l2s_jax.models.adapters import adapter_for, shift_right  # noqa: F401  (re-exported)

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 []
  params: Any  # trainable params only
  opt_state: Any  # mirrors `params` (the frozen LLM has none)


def logits_and_targets(model, variables, batch: dict) -> tuple[Array, Array, Array]:
  """(logits [B, T, V], targets [B, T], weights [B, T]) for any model kind (its adapter's
  `loss_inputs`)."""
  loss = adapter_for(model).loss_inputs(batch)
  return loss.scored(model.apply(variables, **loss.inputs)), loss.targets, loss.weights


def token_losses(logits: Array, targets: Array, label_smoothing: float) -> Array:
  """Per-token cross-entropy [B, T] (float32 or wider), with optional label smoothing."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  return nll


def loss_sums(trainable, frozen, batch, *, model, label_smoothing: float):
  """(sum of token losses, (number of loss tokens, sum of plain NLL)) of one micro-batch."""
  params = adapter_for(model).merge(trainable, frozen)
  logits, targets, weights = logits_and_targets(model, {"params": params}, batch)
  w = weights.astype(jnp.promote_types(logits.dtype, jnp.float32))
  losses = token_losses(logits, targets, label_smoothing)
  nll = token_losses(logits, targets, 0.0) if label_smoothing else losses
  return jnp.sum(losses * w), (jnp.sum(w), jnp.sum(nll * w))


def _split_micro(batch: dict, n: int) -> dict:
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def train_step(
  state: TrainState,
  frozen,
  batch: dict,
  *,
  model,
  tx,
  grad_accum: int,
  label_smoothing: float,
  schedule,
) -> tuple[TrainState, dict]:
  """One optimizer step over `grad_accum` micro-batches of `batch`.

  Gradients of the token-summed loss are accumulated and divided by the
  total number of loss tokens, so accumulation equals one big batch.
  """
  grad_fn = jax.value_and_grad(
    lambda p, f, b: loss_sums(p, f, b, model=model, label_smoothing=label_smoothing), has_aux=True
  )

  def micro(carry, mb):
    g_acc, loss_acc, tok_acc, nll_acc = carry
    (loss_sum, (tok, nll)), g = grad_fn(state.params, frozen, mb)
    return (
      jax.tree.map(jnp.add, g_acc, g),
      loss_acc + loss_sum,
      tok_acc + tok,
      nll_acc + nll,
    ), None

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
  metrics = {
    "loss": loss_sum / denom,
    "nll": nll / denom,
    "tokens": tokens,
    "grad_norm": optax.tree_utils.tree_norm(grads),
    "learning_rate": schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen, batch, *, model) -> dict:
  """Summed NLL and token count of a batch (for a token-weighted mean)."""
  _, (tokens, nll) = loss_sums(params, frozen, batch, model=model, label_smoothing=0.0)
  return {"nll_sum": nll, "tokens": tokens}
