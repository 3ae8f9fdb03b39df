"""A Gemma 3 style decoder in Flax (Linen), with the KV cache passed in and returned.

Axis legend:
  B batch rows, T tokens in this call, D model width, N query heads, K kv heads,
  H head dim, F MLP width, V vocabulary.

Block (pre- and post-norm around both sublayers, as Gemma 3):
  x = x + post_attn_norm(attn(pre_attn_norm(x)))
  x = x + post_ffw_norm(mlp(pre_ffw_norm(x)))

Matmul weights are stored output-major, [out..., in...], as in GGUF and torch (see _matmul).

Every parameter carries logical axis names (embed, vocab, heads, kv_heads, head_dim, mlp,
norm) so one rules table can shard the model (see the sharding config).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from model import attention, native
from model.cache import KVCache, LayerCache
from model.config import ModelConfig
from model.quantize import REDUCE_AXES


def _param(module, name, shape, axes, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Int8Weight(NamedTuple):
  """An int8 matmul weight [*out, *in] and its float32 scale per output channel [*out, 1...].

  native: few-row products go to the native CPU kernel (config.native_kernels).
  """
  q: jax.Array
  scale: jax.Array
  native: bool = False


def _kernel(module, name, shape, axes, init):
  """A matmul weight in its storage dtype (_linear multiplies in it), or an Int8Weight.

  With an int8 quant the stored weight is int8 with one float32 scale per output channel
  (`name_scale`, 1 along the contracted axes `REDUCE_AXES[name]`; model/quantize.py).
  quant="int8" dequantizes it here, written as convert-and-multiply right before the einsum so
  XLA can fuse it into the matmul's operand where the backend supports that (GPU/TPU; XLA CPU
  materialises it). quant="int8_dynamic" keeps it int8 for _matmul_int8.
  """
  c = module.config
  if not c.int8_weights:
    return _param(module, name, shape, axes, init, c.jnp_param_dtype)
  reduce_axes = REDUCE_AXES[name]
  scale_shape = tuple(1 if i in reduce_axes else d for i, d in enumerate(shape))
  scale_axes = tuple(None if i in reduce_axes else a for i, a in enumerate(axes))
  q = _param(module, name, shape, axes, nn.initializers.zeros, jnp.int8)
  scale = _param(module, name + "_scale", scale_shape, scale_axes, nn.initializers.ones, jnp.float32)
  if c.quant == "int8_dynamic":
    return Int8Weight(q, scale, c.native_kernels)
  return q.astype(c.jnp_dtype) * scale.astype(c.jnp_dtype)


def _cpu() -> bool:
  """Whether this trace compiles for XLA CPU, whose matmul wants the layouts chosen below.

  TPU and GPU compilers pick their own layouts; the barriers would only get in their way.
  """
  return jax.default_backend() == "cpu"


def _linear(x, w, num_in: int = 1, out_dtype=None, native_kernel: bool = False):
  """x [..., *in] times an output-major weight w [*out, *in] -> [..., *out].

  Flattens both to 2-D and hands them to _matmul, or to _matmul_int8 for an Int8Weight.
  out_dtype: the result dtype (default: x's dtype). native_kernel: float32 products of a
  few rows may use model/native.py's kernel (config.native_kernels).
  """
  stored = w.q if isinstance(w, Int8Weight) else w
  in_size = math.prod(stored.shape[stored.ndim - num_in:])
  out_shape, lead = stored.shape[:stored.ndim - num_in], x.shape[:x.ndim - num_in]
  x2, out_dtype = x.reshape(-1, in_size), out_dtype or x.dtype
  if isinstance(w, Int8Weight):
    y = _matmul_int8(x2, w.q.reshape(-1, in_size), w.scale.reshape(-1), out_dtype, w.native)
  else:
    y = _matmul(x2, w.reshape(-1, in_size), out_dtype, native_kernel)
  return y.reshape(*lead, *out_shape)


def _native_f32(x2, ws, native_kernel: bool) -> bool:
  """Whether x2 [M,I] times these weights goes to native.f32_linear: float32 weights and
  2..native.max_f32_rows() rows (one row is XLA's matrix-vector product, already at memory
  speed)."""
  return (native_kernel and 2 <= x2.shape[0] <= native.max_f32_rows()
          and all(not isinstance(w, Int8Weight) and w.dtype == jnp.float32 for w in ws))


def _matmul(x2, w2, out_dtype, native_kernel: bool = False):
  """x2 [M,I] times w2 [O,I] -> [M,O], in the weight's dtype, accumulating in out_dtype.

  x is cast to the weight's dtype: a bfloat16 weight is never converted to float32, which on
  XLA CPU would write a float32 copy of it on every call. One row (a batch-1 decode step) is
  a matrix-vector product along the weight's contiguous rows. On CPU, several rows of float32
  run as w [O,I] @ x^T [I,M]: with the weight as the left operand XLA CPU's matmul is ~30%
  faster at 16 rows (Gemma 3 270M's 18 MLPs: 24.8 vs 34.6 ms at batch 16, 100 vs 118 ms for
  a 128-token chunk; the 262144-row vocabulary head: 44 vs 88 ms). The barriers keep the two
  small activation transposes as real copies; without them XLA folds the transposes into the
  matmul and picks the slow form again. native_kernel: 2..native.max_f32_rows() float32 rows
  (16 with AVX-512, none with AVX2) go to the native kernel instead, ~1.4x faster than any of
  these forms there on Intel (model/native.py).
  """
  if _native_f32(x2, [w2], native_kernel):
    return native.f32_linear(x2, [w2])[0].astype(out_dtype)
  x2 = x2.astype(w2.dtype)
  if x2.shape[0] == 1 or w2.dtype != jnp.float32 or not _cpu():
    return _dot_rows(x2, w2, out_dtype)
  y = jnp.matmul(w2, jax.lax.optimization_barrier(x2.T), preferred_element_type=out_dtype)
  return jax.lax.optimization_barrier(y).T


def _dot_rows(x2, w2, out_dtype, input_major: bool = False):
  """x2 [M,I] times w2 [O,I] (or [I,O] if input_major) -> [M,O], written as a plain einsum.

  XLA CPU hands bfloat16 and int8 products to its YNNPACK library from two rows up; a single
  row falls back to a plain loop (the 262144-row head: 200-260 ms against 14-24 ms for two
  rows), so on CPU one such row is padded to two. Float32 keeps its fast one-row product.
  """
  rows = x2.shape[0]
  if rows == 1 and w2.dtype != jnp.float32 and _cpu():
    x2 = jnp.pad(x2, ((0, 1), (0, 0)))
  spec = "MI,IO->MO" if input_major else "MI,OI->MO"
  return jnp.einsum(spec, x2, w2, preferred_element_type=out_dtype)[:rows]


def _matmul_int8(x2, q2, scale, out_dtype, native_kernel: bool = False):
  """x2 [M,I] times int8 q2 [O,I] with per-output-channel scale [O], with dynamic int8
  activations: every row of x is rounded to int8 with its own scale (max |x| / 127),
  multiplied int8 x int8 -> int32, then rescaled by both scales.

  On XLA CPU (YNNPACK, see _dot_rows) the 4x smaller int8 weights make a batch-1 step ~1.7x
  faster than float32 (docs/performance.md). The plain einsum form is the one the library
  takes; _matmul's weight-left form is not handed to it. native_kernel: up to
  native.max_int8_rows() rows go to model/native.py's kernel instead, which computes these
  same floats ~2x faster there.
  """
  if native_kernel and x2.shape[0] <= native.max_int8_rows():
    return native.int8_linear(x2, [(q2, scale)])[0].astype(out_dtype)
  x2 = x2.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x2), axis=1, keepdims=True)
  # Multiplications by reciprocals, written out: XLA rewrites the divisions so anyway, and
  # spelled like this the native kernel can follow the same steps to the same floats.
  x_scale = jnp.where(amax > 0, amax * jnp.float32(1 / 127), 1.0)  # [M,1]
  xq = jnp.round(x2 * (1.0 / x_scale)).astype(jnp.int8)
  acc = _dot_rows(xq, q2, jnp.int32)
  return (acc.astype(jnp.float32) * x_scale * scale).astype(out_dtype)


def _linears(x, ws, native_kernel: bool = False):
  """[_linear(x, w) for w in ws] for weights [*out, in] that all multiply the same x.

  Weights bound for a native kernel share one call (q, k and v; gate and up): the kernel's
  threads are woken once, and int8_dynamic's row is rounded to int8 once.
  """
  x2 = x.reshape(-1, x.shape[-1])
  if _native_f32(x2, ws, native_kernel):
    ys = native.f32_linear(x2, [w.reshape(-1, x2.shape[1]) for w in ws])
    shapes = [w.shape[:-1] for w in ws]
  elif (all(isinstance(w, Int8Weight) and w.native for w in ws)
        and x2.shape[0] <= native.max_int8_rows()):
    ys = native.int8_linear(x2, [(w.q.reshape(-1, x2.shape[1]), w.scale.reshape(-1)) for w in ws])
    shapes = [w.q.shape[:-1] for w in ws]
  else:
    return [_linear(x, w, native_kernel=native_kernel) for w in ws]
  return [y.astype(x.dtype).reshape(*x.shape[:-1], *shape) for y, shape in zip(ys, shapes)]


class RMSNorm(nn.Module):
  """RMSNorm with a (1 + scale) gain, computed in float32 like the reference."""
  eps: float
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.zeros, self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope(x, positions, base: float):
  """Rotary embedding, half-split layout: x [B,T,*,H], positions [B,T]."""
  h = x.shape[-1]
  freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angle = positions[..., None].astype(jnp.float32) * freq  # [B,T,H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  config: ModelConfig
  is_global: bool

  @nn.compact
  def __call__(self, x, positions, valid, cache: LayerCache, row0, filled, decode: bool):
    c = self.config
    init, pd = nn.initializers.normal(0.02), c.jnp_param_dtype
    wq = _kernel(self, "q", (c.num_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), init)
    wk = _kernel(self, "k", (c.num_kv_heads, c.head_dim, c.d_model), ("kv_heads", "head_dim", "embed"), init)
    wv = _kernel(self, "v", (c.num_kv_heads, c.head_dim, c.d_model), ("kv_heads", "head_dim", "embed"), init)
    wo = _kernel(self, "o", (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), init)
    dt = x.dtype
    q, k, v = _linears(x, [wq, wk, wv], c.native_kernels)  # [B,T,N,H], [B,T,K,H] x2
    q = RMSNorm(c.rms_eps, pd, name="q_norm")(q)
    k = RMSNorm(c.rms_eps, pd, name="k_norm")(k)
    base = c.rope_base_global if self.is_global else c.rope_base_local
    q = rope(q, positions, base) * jnp.asarray(c.query_pre_attn_scalar ** -0.5, dt)
    k = rope(k, positions, base)
    if decode:
      out, cache = attention.attend_decode(q, k, v, positions, valid, cache, filled,
                                           c.native_kernels)
    else:
      out, cache = attention.attend_prefill(q, k, v, positions, valid, cache, row0, filled)
    b, _, _, t, h = out.shape  # [B,K,G,T,H] -> [B,T,N,H]; n = k * G + g, as the weight's N
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.num_heads, h)
    return _linear(out, wo, num_in=2, native_kernel=c.native_kernels), cache


class MLP(nn.Module):
  """GeGLU: down(gelu_tanh(gate x) * (up x)), with output-major gate/up [F,D], down [D,F]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    init = nn.initializers.normal(0.02)
    gate = _kernel(self, "gate", (c.ffn_dim, c.d_model), ("mlp", "embed"), init)
    up = _kernel(self, "up", (c.ffn_dim, c.d_model), ("mlp", "embed"), init)
    down = _kernel(self, "down", (c.d_model, c.ffn_dim), ("embed", "mlp"), init)
    g, u = _linears(x, [gate, up], c.native_kernels)
    h = nn.gelu(g, approximate=True) * u
    return _linear(h, down, native_kernel=c.native_kernels)


class Block(nn.Module):
  config: ModelConfig
  is_global: bool

  @nn.compact
  def __call__(self, x, positions, valid, cache, row0, filled, decode):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_eps, c.jnp_param_dtype, name=name)
    a, cache = Attention(c, self.is_global, name="attn")(
        norm("pre_attn_norm")(x), positions, valid, cache, row0, filled, decode)
    x = x + norm("post_attn_norm")(a)
    x = x + norm("post_ffw_norm")(MLP(c, name="mlp")(norm("pre_ffw_norm")(x)))
    return x, cache


class Embedder(nn.Module):
  """Token embedding, scaled by sqrt(D) on the way in, and tied to the output head.

  Held [V,D], [D,V] or packed [V/16, D, 16] by config.embedding_layout (see
  layout_embedding).
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    shape, axes = (c.vocab_size, c.d_model), ("vocab", "embed")
    if c.embedding_layout == "DV":
      shape, axes = shape[::-1], axes[::-1]
    elif c.embedding_layout == "packed":
      shape, axes = (-(-c.vocab_size // native.PACK), c.d_model, native.PACK), axes + (None,)
    if c.int8_weights:  # one scale per vocabulary row: per output channel of the head
      self.embedding = _param(self, "embedding", shape, axes, nn.initializers.zeros, jnp.int8)
      self.embedding_scale = _param(self, "embedding_scale", (c.vocab_size, 1), ("vocab", None),
                                    nn.initializers.ones, jnp.float32)
    else:
      self.embedding = _param(self, "embedding", shape, axes,
                              nn.initializers.normal(c.d_model ** -0.5), c.jnp_param_dtype)

  def encode(self, tokens):
    c = self.config
    if c.embedding_layout == "DV":  # a column per token: [D, *tokens.shape] -> [*tokens.shape, D]
      x = jnp.moveaxis(jnp.take(self.embedding, tokens, axis=1), 0, -1)
    elif c.embedding_layout == "packed":
      x = native.packed_rows(self.embedding, tokens)
    else:
      x = jnp.take(self.embedding, tokens, axis=0)
    x = x.astype(c.jnp_dtype)
    if c.int8_weights:
      x = x * jnp.take(self.embedding_scale, tokens, axis=0).astype(c.jnp_dtype)
    return x * jnp.asarray(c.d_model ** 0.5, c.jnp_dtype)

  def decode(self, h):
    """Logits [..., V] in float32: the tied head is the [V,D] embedding (or another layout
    of it)."""
    c = self.config
    lead = h.shape[:-1]
    if c.embedding_layout == "DV":
      w = self.embedding
      h2 = h.reshape(-1, c.d_model).astype(w.dtype)
      return _dot_rows(h2, w, jnp.float32, input_major=True).reshape(*lead, c.vocab_size)
    if c.embedding_layout == "packed":
      h2 = h.reshape(-1, c.d_model)
      return native.f32_packed_linear(h2, self.embedding, c.vocab_size).reshape(
          *lead, c.vocab_size)
    if c.quant == "int8_dynamic":
      return _linear(h, Int8Weight(self.embedding, self.embedding_scale, c.native_kernels),
                     out_dtype=jnp.float32)
    if c.quant == "int8":  # per-row scales commute with the contraction over D
      logits = _linear(h, self.embedding.astype(h.dtype), out_dtype=jnp.float32)
      return logits * self.embedding_scale[:, 0]
    return _linear(h, self.embedding, out_dtype=jnp.float32, native_kernel=c.native_kernels)


def layout_embedding(config: ModelConfig, params: dict, layout: str = "DV"):
  """(config, params) with the embedding held in `layout` (ModelConfig.embedding_layout).

  A layout for the hardware, not a different model: the logits are the same up to float32
  rounding order. On XLA CPU a one-row head (a one-slot decode step, the last prompt row of
  a prefill) is a vector-times-matrix product, which streams a [D,V] weight ~25% faster
  (Gemma 3 270M's head: 21-23 vs 29-30 ms); from two rows up [V,D] is faster (16 rows: 61 vs
  78 ms). The packed layout is what the native head reads (kernels/f32_packed.cc): 16 rows
  of Gemma 3 270M's head in 16.9-17.9 ms against 20.9-22.2 for [V,D] in f32_linear (AMD Zen
  5). At one row packed and [D,V] in XLA tie on Zen 5 (13.6-14.1 against 14.0-15.0 ms) and
  [D,V] wins on Intel (22.7-23.5 against 23.9-25.5 ms), hence "auto"'s [D,V] for one slot.
  """
  if config.embedding_layout == layout:
    return config, params
  table = params["embedder"]["embedding"]
  if config.embedding_layout == "DV":
    table = table.T
  elif config.embedding_layout == "packed":
    table = native.unpack_weight(table, config.vocab_size)
  if layout == "DV":
    table = table.T
  elif layout == "packed":
    table = native.pack_weight(table)
  embedder = dict(params["embedder"], embedding=table)
  return config.replace(embedding_layout=layout), dict(params, embedder=embedder)


class Transformer(nn.Module):
  """`__call__` returns final hidden states and the updated cache; `logits` maps hidden states
  to vocabulary logits. They are separate so prefill can project only the positions it needs.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    self.embedder = Embedder(c)
    self.blocks = [Block(c, g, name=f"layer_{i}") for i, g in enumerate(c.is_global)]
    self.final_norm = RMSNorm(c.rms_eps, c.jnp_param_dtype)

  def __call__(self, tokens, positions, valid, cache: KVCache, row0, decode: bool = False):
    """tokens/positions/valid: [B,T]. Rows row0..row0+B-1 of the cache are read and written.

    Writes valid tokens into the cache and advances those rows' lengths by their count.
    decode=True (static) is the one-token-per-row step over every cache row (row0 = 0).
    """
    filled = jax.lax.dynamic_slice_in_dim(cache.lengths, row0, tokens.shape[0])
    x = self.embedder.encode(tokens)
    layers = []
    for block, layer_cache in zip(self.blocks, cache.layers):
      x, layer_cache = block(x, positions, valid, layer_cache, row0, filled, decode)
      layers.append(layer_cache)
    new_len = filled + valid.sum(axis=1).astype(jnp.int32)
    lengths = jax.lax.dynamic_update_slice_in_dim(cache.lengths, new_len, row0, 0)
    return self.final_norm(x), cache.replace(layers=tuple(layers), lengths=lengths)

  def logits(self, h):
    return self.embedder.decode(h)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng) -> dict:
  """Random parameters (unboxed), e.g. for the tiny test config."""
  from model.cache import init_cache
  model = Transformer(config)
  cache = init_cache(config, 1, 8)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = model.init(rng, tokens, tokens, tokens > -1, cache, 0)
  params = nn.meta.unbox(variables["params"])
  # Norm scales init to 0 (gain 1); randomise them a little so tests exercise them.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
            if jax.tree_util.keystr(path).endswith("['scale']") else x
            for (path, x), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def logical_axes(config: ModelConfig) -> dict:
  """Pytree of logical axis-name tuples matching the params (for sharding rules)."""
  from model.cache import init_cache
  model = Transformer(config)
  cache = init_cache(config, 1, 8)
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, tokens > -1, cache, 0))
  return nn.get_partition_spec(abstract)["params"]
