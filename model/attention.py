"""Attention over the blockwise-read KV cache, for prefill chunks and decode steps.

Axis legend:
  B  rows in this call (1 for a prefill chunk, S slots for a decode step)
  T  query length of this call (the chunk length; 1 when decoding)
  S  key length (T for the new keys, `block` for one cache block)
  N  query heads, K kv heads, G = N // K query heads per kv head, H head dim

Prefill: a call brings T new tokens at positions `start .. start+T-1` (padding marked
invalid). They attend to each other densely (causal), and to the cache blocks filled before
this call. The partial softmaxes are merged with the usual running max / running sum
("online softmax"), so the result equals one softmax over all keys. The chunk is written
before those reads in global layers and after them in sliding-window rings (see
attend_prefill). Decode: the one new token per row is written first, then read back.

Which position sits at cache index i (ring of capacity C, last written position `last`):
  kpos(i) = last - ((last - i) mod C)
Worked example, C = 8, last = 10: index 2 holds 10, index 3 holds 3 (10 - 7), index 0 holds 8.
A global layer (C >= every position) gives kpos(i) = i for i <= last, and a negative
(invalid) position for i > last; an empty slot (last = -1) gives only negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from model import native
from model.cache import LayerCache

_NEG = -1e30  # a finite "minus infinity": exp() underflows to 0 without producing NaNs


def _mask(q_pos, k_pos, k_ok, window):
  """[B, T, S] bool: key is valid, not in the future, and inside the sliding window."""
  ok = k_ok[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
  if window is not None:
    ok &= q_pos[:, :, None] - k_pos[:, None, :] < window
  return ok


def _scores(q, k, mask):
  """q [B,T,K,G,H], k [B,S,K,H] -> masked scores [B,K,G,T,S] in float32."""
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None, None, :, :], s, _NEG)


def _merge(state, s, v):
  """Fold one more block of scores s [B,K,G,T,S] and values v [B,S,K,H] into the softmax."""
  m, l, acc = state
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.exp(s - m_new[..., None])
  # Rows where every key so far is masked keep m = _NEG; p is then exp(0) = 1 for masked
  # entries, so zero them explicitly.
  p = jnp.where(s > _NEG / 2, p, 0.0)
  correction = jnp.exp(m - m_new)
  l = l * correction + p.sum(axis=-1)
  pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc = acc * correction[..., None] + pv
  return m_new, l, acc


def _softmax_state(shape, h):
  m = jnp.full(shape, _NEG, jnp.float32)
  return m, jnp.zeros_like(m), jnp.zeros(shape + (h,), jnp.float32)


def _attend_cache(qg, q_pos, k_src, v_src, last, window, cap, blk, state):
  """Fold the cache blocks holding positions <= last [B] into the softmax state.

  k_src/v_src [B,C,K,H] hold exactly this call's rows. The trip count is computed on device
  from the filled length: unfilled blocks are never read.
  """
  num_blocks = (jnp.minimum(jnp.max(last) + 1, cap) + blk - 1) // blk

  def body(carry):
    i, st = carry
    k_blk = lax.dynamic_slice_in_dim(k_src, i * blk, blk, 1)
    v_blk = lax.dynamic_slice_in_dim(v_src, i * blk, blk, 1)
    idx = i * blk + jnp.arange(blk)
    k_pos = last[:, None] - jnp.mod(last[:, None] - idx[None, :], cap)
    mask = _mask(q_pos, k_pos, k_pos >= 0, window)
    return i + 1, _merge(st, _scores(qg, k_blk, mask), v_blk)

  return lax.while_loop(lambda c: c[0] < num_blocks, body, (jnp.int32(0), state))[1]


def _finish(state, q):
  """Normalised output [B,K,G,T,H]; the caller contracts it with the output projection."""
  _, l, acc = state
  return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)


def attend_prefill(q, k_new, v_new, q_pos, new_ok, cache: LayerCache, row0, filled):
  """Prefill a chunk: returns (attention output [B,T,N,H], cache with the chunk written).

  q [B,T,N,H] is scaled and rotated; k_new, v_new [B,T,K,H] are the chunk's keys/values at
  positions q_pos [B,T]; new_ok marks real (non-padding) tokens; rows row0.. of the cache
  hold `filled` [B] tokens written before this chunk.

  A global layer's ring never wraps, so the chunk is written first and the old keys are
  read in place, the new positions masked out (kpos is negative past `filled - 1`). In a
  sliding-window ring the reads happen before the write, because a chunk would overwrite
  keys its own first queries still need; they read a copy of just this call's rows, since
  reading the shared buffer itself would make XLA copy all of it to protect it from the
  write that follows. (Copying a global layer's rows too cost ~15 ms of a 128-token
  prefill of Gemma 3 270M on CPU: 4 MB per row at max_len 4096.)
  """
  b, t, n, h = q.shape
  kv = k_new.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  s = _scores(qg, k_new, _mask(q_pos, q_pos, new_ok, cache.window))
  state = _merge(_softmax_state(s.shape[:-1], h), s, v_new)
  if cache.window is None:
    cache = write(cache, k_new, v_new, q_pos, new_ok, row0)
    rows_k = lax.dynamic_slice_in_dim(cache.k, row0, b, 0)
    rows_v = lax.dynamic_slice_in_dim(cache.v, row0, b, 0)
  else:
    # The barrier makes the row copy real; otherwise XLA folds the slice into the loop's
    # reads and then protects the whole shared buffer from the write with full copies.
    rows_k, rows_v = lax.optimization_barrier((lax.dynamic_slice_in_dim(cache.k, row0, b, 0),
                                               lax.dynamic_slice_in_dim(cache.v, row0, b, 0)))
  state = _attend_cache(qg, q_pos, rows_k, rows_v, filled - 1, cache.window,
                        cache.capacity, cache.block, state)
  if cache.window is not None:
    cache = write(cache, k_new, v_new, q_pos, new_ok, row0)
  return _finish(state, q), cache


def attend_decode(q, k_new, v_new, q_pos, new_ok, cache: LayerCache, filled,
                  native_kernel: bool = False):
  """One token per row for every row of the cache: (output [B,K,G,1,H], updated cache).

  The new key is written first and then read back with all the others. With one token
  per row that is safe (position p overwrites p - C, outside every window), and it lets
  XLA update the cache in place: reading a buffer that is written afterwards forces a
  copy of it (measured on Gemma 3 270M: ~54 MB of copies and page faults per step).
  native_kernel: a float32 cache is read by model/native.py's kernel instead of the block
  loop, which on XLA CPU copies every block it reads.
  """
  b, t, n, h = q.shape
  kv = k_new.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  cache = write(cache, k_new, v_new, q_pos, new_ok, 0)
  last = filled - 1 + new_ok[:, 0].astype(filled.dtype)
  if native_kernel and cache.k.dtype == jnp.float32:
    out = native.attend_decode(qg[:, 0].astype(jnp.float32), cache.k, cache.v, last,
                               q_pos[:, 0], cache.window)
    return out[:, :, :, None, :].astype(q.dtype), cache
  state = _attend_cache(qg, q_pos, cache.k, cache.v, last, cache.window, cache.capacity,
                        cache.block, _softmax_state((b, kv, n // kv, t), h))
  return _finish(state, q), cache


def write(cache: LayerCache, k_new, v_new, q_pos, new_ok, row0) -> LayerCache:
  """Write the valid new keys/values into rows row0.. at index pos % C.

  When a chunk is longer than a ring, only its last C valid positions are kept; everything
  else (padding, inactive slots, superseded ring entries) gets an out-of-range index and is
  dropped by the scatter, so no two writes ever target the same index.
  """
  cap = cache.capacity
  last_valid = jnp.max(jnp.where(new_ok, q_pos, -1), axis=1, keepdims=True)
  keep = new_ok & (q_pos > last_valid - cap)
  idx = jnp.where(keep, jnp.mod(q_pos, cap), cap)
  rows = row0 + jnp.arange(k_new.shape[0])[:, None]
  k = cache.k.at[rows, idx].set(k_new.astype(cache.k.dtype), mode="drop")
  v = cache.v.at[rows, idx].set(v_new.astype(cache.v.dtype), mode="drop")
  return cache.replace(k=k, v=v)
