"""pack(): the one small row per slot the host reads each step."""

import jax
import jax.numpy as jnp
import numpy as np

from decode import steps
from decode.sampling import make_params, stack

V = 262144  # Gemma 3's vocabulary width: wide rows are where vectorised reductions differ


def _pack(logits, top_n):
  params = stack([make_params()] * logits.shape[0])
  step = jnp.zeros((logits.shape[0],), jnp.int32)
  return np.asarray(jax.jit(steps.pack, static_argnums=3)(logits, params, step, top_n)[1])


def test_logprobs_match_log_softmax():
  logits = jnp.asarray(np.random.RandomState(0).randn(3, V).astype(np.float32) * 4)
  packed = _pack(logits, top_n=4)
  ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  tokens = packed[:, 0].astype(int)
  np.testing.assert_array_equal(tokens, np.argmax(ref, axis=-1))
  np.testing.assert_allclose(packed[:, 1], ref[np.arange(3), tokens], atol=1e-4)
  top_ids = packed[:, 3:7].astype(int)
  np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :4])
  np.testing.assert_allclose(packed[:, 7:11], np.take_along_axis(ref, top_ids, 1), atol=1e-4)
  assert (packed[:, 2] == 1.0).all()


def test_one_bad_logit_in_a_wide_row_marks_the_row_not_finite():
  """NaN or +inf anywhere, or every logit -inf, leave no log-softmax: the row is flagged.
  A single -inf is a token of probability 0 and the row stays usable."""
  logits = np.zeros((5, V), np.float32)
  logits[1, 12345] = np.nan
  logits[2, 7] = np.inf
  logits[3, V - 1] = -np.inf
  logits[4] = -np.inf
  packed = _pack(jnp.asarray(logits), top_n=0)
  np.testing.assert_array_equal(packed[:, 2], [1.0, 0.0, 0.0, 1.0, 0.0])
  assert packed[3, 0] != V - 1 and np.isfinite(packed[3, 1])


def test_release_puts_the_slot_back_to_greedy():
  from model.cache import init_cache
  from model.config import get_config
  state = steps.init_state(init_cache(get_config("tiny"), 2, 16))
  hot = make_params(temperature=0.9, top_k=5, top_p=0.5, min_p=0.1, seed=3, logit_bias={7: 1.0})
  state = state.replace(active=jnp.ones((2,), bool),
                        sampling=jax.tree.map(lambda *r: jnp.stack(r), hot, hot))
  state = jax.jit(steps.release)(state, 1)
  assert np.asarray(state.active).tolist() == [True, False]
  for default, got, hot_value in zip(jax.tree.leaves(make_params()), jax.tree.leaves(state.sampling),
                                     jax.tree.leaves(hot)):
    np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(default))  # released: greedy
    np.testing.assert_array_equal(np.asarray(got)[0], np.asarray(hot_value))  # untouched
