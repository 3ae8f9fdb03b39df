"""The two device functions, prefill and decode_step, and a fused loop built from the same step.

They are pure: params and state go in, new state and one small output array come out. The
caller jits them with the model static and the state donated, e.g.

  decode = jax.jit(decode_step, static_argnums=(0, 3), donate_argnums=2)

Output rows are packed into one float32 array so the host makes one device-to-host copy per
step for all slots:
  [token_id, logprob, finite, top_ids[0..n), top_logprobs[0..n)]      (width 3 + 2n)
`finite` is 1.0 when the row's log-softmax is well defined: no logit is NaN or +inf and not
all are -inf. Otherwise the token is garbage, and the host ends that request with an error
instead of streaming it. (A -inf logit alone is a token of probability 0, never drawn.)
Token ids below 2**24 are exact in float32 (Gemma's vocabulary is 2**18).
`logprob` is the model's log-probability of the chosen token (before bias, temperature and
filters), the figure logprob APIs report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from decode import sampling
from decode.sampling import SamplingParams
from model.cache import KVCache
from model.transformer import Transformer


@struct.dataclass
class DecodeState:
  """Everything the device needs to advance every slot by one token.

  cache: the KV cache (its `lengths` are the positions of the next token per slot).
  tokens: [S] the token each slot feeds into the next step (last sampled).
  active: [S] whether the slot holds a live request; inactive slots write nothing.
  num_generated: [S] tokens sampled so far for the slot's request (the RNG step).
  sampling: per-slot SamplingParams.
  """
  cache: KVCache
  tokens: jax.Array
  active: jax.Array
  num_generated: jax.Array
  sampling: SamplingParams


def init_state(cache: KVCache, max_bias: int = 16) -> DecodeState:
  s = cache.num_slots
  row = sampling.make_params(max_bias=max_bias)
  return DecodeState(
      cache=cache, tokens=jnp.zeros((s,), jnp.int32), active=jnp.zeros((s,), bool),
      num_generated=jnp.zeros((s,), jnp.int32), sampling=sampling.stack([row] * s))


def packed_width(top_n: int) -> int:
  return 3 + 2 * top_n


def pack(logits, params: SamplingParams, step, top_n: int):
  """Sample from float32 logits [B,V] and pack [B, packed_width(n)] for the host.

  Log-probabilities are logit - logsumexp: a full log_softmax would write another [B,V] array.
  `finite` tests the log-sum-exp, which is NaN when some logit is NaN (exp(NaN - max) is NaN
  even though XLA CPU's vectorised max does not propagate NaNs) or +inf (inf - inf), and
  -inf when all are -inf: no pass over the row beyond the two the log-probabilities need.
  (A separate sum of logits * 0 cost 2.2 ms of a 13 ms int8_dynamic step on CPU: XLA hands
  it to YNNPACK, whose threads wake late after the head's product.)
  """
  tokens = sampling.sample(logits, params, step)
  m = logits.max(axis=1, keepdims=True)
  lse = m + jnp.log(jnp.exp(logits - m).sum(axis=1, keepdims=True))
  chosen = jnp.take_along_axis(logits, tokens[:, None], axis=1) - lse
  finite = jnp.isfinite(lse).astype(jnp.float32)
  cols = [tokens[:, None].astype(jnp.float32), chosen, finite]
  if top_n:
    top_logits, top_ids = jax.lax.top_k(logits, top_n)
    cols += [top_ids.astype(jnp.float32), top_logits - lse]
  return tokens, jnp.concatenate(cols, axis=1)


def prefill(model: Transformer, params, state: DecodeState, tokens, n_real, start, slot,
            request: SamplingParams, top_n: int = 0, *, last_chunk: bool = True):
  """Write one bucket-padded chunk of a prompt into `slot`, starting at position `start`.

  tokens: [T] ids, of which the first n_real are real; padding is never written or attended.
  Intermediate chunks (last_chunk=False, static) stop after the cache write: no logits.
  The last chunk projects only the hidden state of the last real token onto the vocabulary,
  samples the first new token there, and arms the slot for decode_step.
  Returns (state, packed row) — zeros for intermediate chunks.
  """
  t = tokens.shape[0]
  cache = state.cache
  # A first chunk (start 0) replaces whatever an earlier request left in this slot.
  cache = cache.replace(lengths=cache.lengths.at[slot].set(start))
  positions = (start + jnp.arange(t, dtype=jnp.int32))[None]
  valid = (jnp.arange(t) < n_real)[None]
  h, cache = model.apply({"params": params}, tokens[None], positions, valid, cache, slot)
  state = state.replace(cache=cache)
  if not last_chunk:
    return state, jnp.zeros((packed_width(top_n),), jnp.float32)
  h_last = jax.lax.dynamic_index_in_dim(h[0], n_real - 1, 0, keepdims=True)  # [1, D]
  logits = model.apply({"params": params}, h_last, method=Transformer.logits)
  req = jax.tree.map(lambda x: x[None], request)
  token, packed = pack(logits, req, jnp.zeros((1,), jnp.int32), top_n)
  put = lambda arr, val: arr.at[slot].set(val)
  state = state.replace(
      tokens=put(state.tokens, token[0]), active=put(state.active, True),
      num_generated=put(state.num_generated, 1),
      sampling=jax.tree.map(put, state.sampling, request))
  return state, packed[0]


def decode_step(model: Transformer, params, state: DecodeState, top_n: int = 0):
  """Advance every active slot by one token. Returns (state, packed [S, width])."""
  cache = state.cache
  positions = cache.lengths[:, None]
  h, cache = model.apply({"params": params}, state.tokens[:, None], positions,
                         state.active[:, None], cache, 0, decode=True)
  logits = model.apply({"params": params}, h[:, 0], method=Transformer.logits)
  tokens, packed = pack(logits, state.sampling, state.num_generated, top_n)
  state = state.replace(
      cache=cache, tokens=jnp.where(state.active, tokens, state.tokens),
      num_generated=state.num_generated + state.active.astype(jnp.int32))
  return state, packed


def release(state: DecodeState, slot) -> DecodeState:
  """Free a slot: it stops writing to the cache at once.

  Its sampling settings go back to greedy: the filters and the draw run when any slot asks
  for them, so a finished sampled request would otherwise keep every later step paying.
  """
  off = sampling.make_params(max_bias=state.sampling.bias_ids.shape[1])
  return state.replace(
      active=state.active.at[slot].set(False),
      sampling=jax.tree.map(lambda arr, val: arr.at[slot].set(val), state.sampling, off))


def generate_fused(model: Transformer, params, state: DecodeState, num_steps: int,
                   top_n: int = 0):
  """`num_steps` decode steps inside one `lax.scan`: the no-host-in-the-loop baseline.

  Uses the very same decode_step, so streaming and fused generation must agree token for
  token. Returns (state, packed [num_steps, S, 3+2n]).
  """
  def body(st, _):
    return decode_step(model, params, st, top_n)
  return jax.lax.scan(body, state, None, length=num_steps)
