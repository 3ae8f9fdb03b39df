"""A test-only full forward: logits at every position of one sequence, padded to a bucket
so that prompts of different lengths share one compiled program."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.transformer import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _padded_logits(model, params, tokens, n):
  t = tokens.shape[0]
  cache = init_cache(model.config, 1, t, block=256)
  pos = jnp.arange(t)[None]
  h, _ = model.apply({"params": params}, tokens[None], pos, pos < n, cache, 0)
  return model.apply({"params": params}, h[0], method=Transformer.logits)


def all_logits(config, params, ids, bucket: int = 128) -> np.ndarray:
  """[len(ids), V] float32 logits; the sequence is padded to a multiple of `bucket`."""
  n = len(ids)
  padded = np.zeros(-(-n // bucket) * bucket, np.int32)
  padded[:n] = ids
  return np.asarray(_padded_logits(Transformer(config), params, padded, n))[:n]
