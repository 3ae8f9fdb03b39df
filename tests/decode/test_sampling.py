"""Sampling contracts: greedy is argmax, filters keep exactly the right sets, seeds reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import sampling
from decode.sampling import make_params, stack

V = 4096  # a multiple of 512, so sample() takes the chunked argmax and two-level draw


def _logits(rows, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(rows, V).astype(np.float32) * 3)


def _params(rows, **kw):
  return stack([make_params(**kw)] * rows)


_sample = jax.jit(sampling.sample)


def _draws(logits, params, n=64):
  """n draws per row with different steps, so different random keys."""
  return np.stack([np.asarray(_sample(logits, params, jnp.full((logits.shape[0],), i, jnp.int32)))
                   for i in range(n)])


def test_temperature_zero_is_argmax():
  logits = _logits(4)
  got = _draws(logits, _params(4, temperature=0.0, top_k=3, top_p=0.5), n=3)
  assert (got == np.asarray(jnp.argmax(logits, -1))).all()


def test_top_k_never_leaves_the_top_k():
  logits = _logits(3)
  draws = _draws(logits, _params(3, temperature=5.0, top_k=7), n=200)
  for row in range(3):
    allowed = set(np.argsort(-np.asarray(logits[row]))[:7])
    assert set(draws[:, row]) <= allowed
    assert len(set(draws[:, row])) > 3  # high temperature spreads over the allowed set


def test_top_k_keeps_exactly_the_k_largest():
  """Row 1 fits the candidates, row 2 takes the bisection, row 0 has top-k off."""
  ks = [0, 7, sampling._CANDIDATES + 44]
  logits = _logits(3, seed=4)
  params = stack([make_params(temperature=1.0, top_k=k) for k in ks])
  kept = np.isfinite(np.asarray(jax.jit(sampling.top_k)(logits, params)))
  assert kept[0].all()
  for row in (1, 2):
    assert set(np.flatnonzero(kept[row])) == set(np.argsort(-np.asarray(logits[row]))[:ks[row]])


def test_top_k_one_equals_greedy():
  logits = _logits(5)
  draws = _draws(logits, _params(5, temperature=1.0, top_k=1), n=5)
  assert (draws == np.asarray(jnp.argmax(logits, -1))).all()


@pytest.mark.parametrize("top_p, scale", [(0.3, 1), (0.75, 1), (0.95, 1), (0.9, 0.05)])
def test_top_p_keeps_smallest_set_reaching_p(top_p, scale):
  """scale 0.05 flattens the distribution so the set outgrows the candidates (bisection path)."""
  logits = _logits(2, seed=1) * scale
  params = _params(2, temperature=1.0, top_p=top_p)
  kept = np.isfinite(np.asarray(jax.jit(sampling.top_p)(logits, params)))
  for row in range(2):
    p = np.asarray(jax.nn.softmax(logits[row]))
    order = np.argsort(-p)
    need = np.searchsorted(np.cumsum(p[order]), top_p) + 1  # smallest prefix with mass >= p
    assert set(np.flatnonzero(kept[row])) == set(order[:need])


def test_min_p_keeps_tokens_above_fraction_of_max():
  logits = _logits(2, seed=2)
  params = _params(2, temperature=1.0, min_p=0.1)
  kept = np.isfinite(np.asarray(jax.jit(sampling.min_p)(logits, params)))
  p = np.asarray(jax.nn.softmax(logits, -1))
  np.testing.assert_array_equal(kept, p >= 0.1 * p.max(-1, keepdims=True))


def test_filters_share_one_signature_and_off_is_identity():
  logits = _logits(2)
  off = _params(2, temperature=1.0)
  for f in sampling.FILTERS + (sampling.logit_bias,):
    np.testing.assert_array_equal(np.asarray(f(logits, off)), np.asarray(logits))


def test_logit_bias_bans_and_forces():
  logits = _logits(2)
  top = int(jnp.argmax(logits[0]))
  banned = _params(2, logit_bias={top: -np.inf})
  assert int(_sample(logits, banned, jnp.zeros(2, jnp.int32))[0]) != top
  forced = _params(2, temperature=1.0, logit_bias={5: 1e4})
  assert (_draws(logits, forced, n=10) == 5).all()


def test_mixed_settings_per_row():
  logits = _logits(3)
  params = stack([make_params(), make_params(temperature=1.0, top_k=2, seed=1),
                  make_params(temperature=1.0, min_p=0.5, seed=2)])
  draws = _draws(logits, params, n=50)
  assert (draws[:, 0] == int(jnp.argmax(logits[0]))).all()
  assert set(draws[:, 1]) <= set(np.argsort(-np.asarray(logits[1]))[:2])


def test_seed_reproduces_whatever_the_row_and_batch():
  logits1 = _logits(1, seed=3)
  alone = _draws(logits1, _params(1, temperature=1.0, seed=42), n=20)[:, 0]
  # The same logits in row 2 of a batch with other requests, other seeds and settings.
  batch = jnp.concatenate([_logits(2, seed=9), logits1], axis=0)
  params = stack([make_params(temperature=0.7, seed=1), make_params(temperature=1.0, top_k=3, seed=2),
                  make_params(temperature=1.0, seed=42)])
  np.testing.assert_array_equal(_draws(batch, params, n=20)[:, 2], alone)
  other_seed = _draws(logits1, _params(1, temperature=1.0, seed=43), n=20)[:, 0]
  assert (other_seed != alone).any()


def test_bad_values_are_rejected_with_the_number():
  for kw, msg in [({"temperature": -1}, "-1"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "-2"),
                  ({"min_p": 1.0}, "min_p")]:
    with pytest.raises(ValueError, match=msg):
      make_params(**kw)


@pytest.mark.parametrize("chunk", [64, 512])
def test_chunked_argmax_is_jnp_argmax_including_ties(chunk):
  rng = np.random.RandomState(3)
  x = rng.randint(-50, 50, size=(6, 4096)).astype(np.float32)  # many ties
  x[1, [100, 3000]] = 99.0  # tie across chunks: the first wins
  x[2, [700, 701]] = 99.0  # tie inside one chunk
  x[3, -1] = 99.0  # the last entry
  got = np.asarray(jax.jit(sampling.argmax, static_argnums=1)(jnp.asarray(x), chunk))
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  assert got[1] == 100 and got[2] == 700 and got[3] == 4095


@pytest.mark.parametrize("chunk", [16, 512])
def test_categorical_draws_follow_softmax(chunk):
  """4000 independent draws (one per row key) against softmax; chunk 16 takes the two-level path."""
  logits = np.full((256,), -np.inf, np.float32)
  logits[[3, 17, 18, 200]] = np.log([0.5, 0.25, 0.15, 0.1])  # entries spread over chunks
  n = 4000
  x = jnp.broadcast_to(jnp.asarray(logits), (n, 256))
  keys = jax.vmap(jax.random.key)(jnp.arange(n, dtype=jnp.uint32))
  draws = np.asarray(jax.jit(sampling.categorical, static_argnums=2)(x, keys, chunk))
  assert set(draws) <= {3, 17, 18, 200}  # never an entry at -inf
  for token, p in [(3, 0.5), (17, 0.25), (18, 0.15), (200, 0.1)]:
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(np.mean(draws == token) - p) < 4 * sigma, (token, np.mean(draws == token))
