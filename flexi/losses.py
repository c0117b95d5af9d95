"""Classification losses on (batch, classes) logits and (multi-)one-hot labels."""
import jax
import jax.numpy as jnp


def softmax_xent(logits, labels, reduction=True):
  per_example = -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
  return jnp.mean(per_example) if reduction else per_example


def sigmoid_xent(logits, labels, reduction=True):
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  per_example = -jnp.sum(labels * log_p + (1. - labels) * log_not_p, axis=-1)
  return jnp.mean(per_example) if reduction else per_example


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def get(name):
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
  return LOSSES[name]
