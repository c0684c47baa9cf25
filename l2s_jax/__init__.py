"""l2s-jax: hybrid large/small language-model decoding in JAX/Flax."""

__version__ = "0.1.0"
