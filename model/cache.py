"""The KV cache: an explicit, fixed-shape pytree passed into and out of every step.

Axes: S cache slots (one request each), C cache capacity per layer, K kv heads, H head dim.

Layout per layer: `k, v: [S, C, K, H]`, written as a ring buffer. Position p lives at
index `p % C`. A global layer has C >= max_len, so the ring never wraps and index == position.
A sliding-window layer only ever needs the last `window` keys, so its C is the window
(rounded up to a whole block): 512 positions for Gemma 3 270M however long the context.

Reading only what is filled: attention walks the cache in blocks of `block` positions with a
`lax.while_loop` whose trip count is computed on device from the filled length
(`ceil(min(filled, C) / block)`), so a step at context 300 reads 2 blocks of a 32K global
cache, not 128. Shapes stay static (no recompiles); only the loop count changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model.config import ModelConfig


@struct.dataclass
class LayerCache:
  k: jax.Array  # [S, C, K, H]
  v: jax.Array  # [S, C, K, H]
  window: int | None = struct.field(pytree_node=False)  # None: global attention
  block: int = struct.field(pytree_node=False)  # positions read per loop iteration

  @property
  def capacity(self) -> int:
    return self.k.shape[1]


@struct.dataclass
class KVCache:
  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # [S] int32: tokens written so far in each slot
  max_len: int = struct.field(pytree_node=False)

  @property
  def num_slots(self) -> int:
    return self.lengths.shape[0]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def layer_capacity(window: int | None, max_len: int, block: int) -> tuple[int, int]:
  """(capacity, block) of one layer: the window for local layers, max_len for global ones."""
  raw = max_len if window is None else min(window, max_len)
  blk = min(block, raw)
  return _round_up(raw, blk), blk


def init_cache(config: ModelConfig, num_slots: int, max_len: int, dtype=None,
               block: int = 256) -> KVCache:
  """An empty cache of `num_slots` slots, each able to hold `max_len` tokens."""
  if max_len > config.max_context:
    raise ValueError(f"max_len={max_len} exceeds the model's max_context={config.max_context}")
  dtype = dtype or config.jnp_dtype
  layers = []
  for is_global in config.is_global:
    window = None if is_global else config.sliding_window
    cap, blk = layer_capacity(window, max_len, block)
    shape = (num_slots, cap, config.num_kv_heads, config.head_dim)
    layers.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), window, blk))
  return KVCache(tuple(layers), jnp.zeros((num_slots,), jnp.int32), max_len)


def cache_bytes_read(cache: KVCache, filled: int, whole_blocks: bool = True) -> int:
  """Bytes of K and V one decode step reads for one slot at a given filled length.

  whole_blocks: as XLA's attention reads them, in whole blocks (model/attention.py); False:
  the filled positions alone, as the native kernel reads them, the least any step can read.
  """
  total = 0
  for layer in cache.layers:
    used = min(filled, layer.capacity)
    if whole_blocks:
      used = -(-used // layer.block) * layer.block
    per_pos = layer.k.shape[2] * layer.k.shape[3] * layer.k.dtype.itemsize * 2
    total += used * per_pos
  return total
