"""Cached prefill + decode must equal a full forward pass at every position."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import cache as cache_lib, native
from model.config import PRESETS, get_config
from model.transformer import Transformer, init_params, layout_embedding, logical_axes
from tests.model import naive


@jax.jit(static_argnums=0)
def _forward(model, params, cache, tokens, start, n_real, row):
  t = tokens.shape[0]
  positions = (start + jnp.arange(t))[None]
  valid = (jnp.arange(t) < n_real)[None]
  cache = cache.replace(lengths=cache.lengths.at[row].set(start))
  h, cache = model.apply({"params": params}, jnp.asarray(tokens)[None], positions, valid, cache, row)
  return model.apply({"params": params}, h[0], method=Transformer.logits), cache


@jax.jit(static_argnums=0)
def _decode(model, params, cache, tokens, active):
  h, cache = model.apply({"params": params}, tokens, cache.lengths[:, None], active, cache, 0,
                         decode=True)
  return model.apply({"params": params}, h[:, 0], method=Transformer.logits), cache


@pytest.fixture(scope="module")
def seq(tiny_config):
  # 3x the sliding window (8), so local layers wrap their ring buffer several times.
  return np.random.RandomState(0).randint(0, tiny_config.vocab_size, 27)


def test_full_forward_matches_naive_reference(tiny_config, tiny_params, seq):
  ref = naive.forward(tiny_config, jax.tree.map(np.asarray, tiny_params), seq)
  cache = cache_lib.init_cache(tiny_config, 1, 64, block=4)
  logits, _ = _forward(Transformer(tiny_config), tiny_params, cache, seq, 0, len(seq), 0)
  np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("native_kernels", [False, True], ids=["xla", "native"])
@pytest.mark.parametrize("prefix_len,chunk", [(1, 16), (5, 16), (13, 4), (13, 16)])
def test_prefill_then_decode_matches_at_every_position(tiny_config, tiny_params, seq, prefix_len,
                                                       chunk, native_kernels):
  """Prefill `prefix_len` tokens (in chunks of `chunk`, padded), then decode one at a time
  in slot 2 of 3 while the other slots sit idle; every position's logits match. native: the
  decode steps' attention runs in model/native.py's kernel (the ring wraps three times)."""
  if native_kernels and native.unsupported_here():
    pytest.skip(f"native kernels: {native.unsupported_here()}")
  ref = naive.forward(tiny_config, jax.tree.map(np.asarray, tiny_params), seq)
  model = Transformer(tiny_config.replace(native_kernels=native_kernels))
  cache = cache_lib.init_cache(tiny_config, 3, 64, block=4)
  got = {}
  for start in range(0, prefix_len, chunk):
    n = min(chunk, prefix_len - start)
    padded = np.zeros(chunk, np.int32)
    padded[:n] = seq[start:start + n]
    logits, cache = _forward(model, tiny_params, cache, padded, start, n, 2)
    got.update({start + i: np.asarray(logits[i]) for i in range(n)})
  assert int(cache.lengths[2]) == prefix_len
  for pos in range(prefix_len, len(seq)):
    tokens = jnp.zeros((3, 1), jnp.int32).at[2, 0].set(int(seq[pos]))
    active = jnp.array([[False], [False], [True]])
    logits, cache = _decode(model, tiny_params, cache, tokens, active)
    got[pos] = np.asarray(logits[2])
  np.testing.assert_allclose(np.stack([got[i] for i in range(len(seq))]), ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [0, 0, len(seq)])


@pytest.mark.parametrize("layout", ["DV", "packed"])
def test_embedding_layouts_are_the_same_model(tiny_config, tiny_params, seq, layout):
  """[D,V] and packed [V/16, D, 16] change how the lookup and the head read the table, not
  the logits: prefill rows, a one-row decode step and a three-row decode step all match
  [V,D]. (A partial last block of 16 is tests/model/test_native.py's.)"""
  if layout == "packed" and native.unsupported_here():
    pytest.skip(f"native kernels: {native.unsupported_here()}")
  cfg_t, params_t = layout_embedding(tiny_config, tiny_params, layout)
  table = params_t["embedder"]["embedding"]
  d, v = tiny_config.d_model, tiny_config.vocab_size
  if layout == "DV":
    assert table.shape == (d, v)
    assert tuple(logical_axes(cfg_t)["embedder"]["embedding"]) == ("embed", "vocab")
  else:
    assert table.shape == (-(-v // 16), d, 16)
    assert tuple(logical_axes(cfg_t)["embedder"]["embedding"]) == ("vocab", "embed", None)
  back_config, back = layout_embedding(cfg_t, params_t, "VD")
  assert back_config == tiny_config
  np.testing.assert_array_equal(back["embedder"]["embedding"],
                                tiny_params["embedder"]["embedding"])
  for slots in (1, 3):
    out = []
    for cfg, params in ((tiny_config, tiny_params), (cfg_t, params_t)):
      model = Transformer(cfg)
      cache = cache_lib.init_cache(cfg, slots, 64, block=4)
      logits, cache = _forward(model, params, cache, seq[:16], 0, 12, 0)
      steps = [logits[:12]]
      for pos in range(12, 16):
        tokens = jnp.full((slots, 1), int(seq[pos]), jnp.int32)
        logits, cache = _decode(model, params, cache, tokens, jnp.ones((slots, 1), bool))
        steps.append(logits[:1])
      out.append(np.concatenate(steps))
    np.testing.assert_allclose(out[1], out[0], atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="float storage"):
    cfg_t.replace(quant="int8")
  if layout == "packed":
    with pytest.raises(ValueError, match="float32 storage"):
      cfg_t.replace(param_dtype="bfloat16")


def test_padding_does_not_change_logits(tiny_config, tiny_params, seq):
  model = Transformer(tiny_config)
  prompt = seq[:11]
  outs = []
  for bucket in (11, 16, 32):
    padded = np.full(bucket, 7, np.int32)  # nonzero padding: it must be ignored, not just zero
    padded[:11] = prompt
    cache = cache_lib.init_cache(tiny_config, 1, 64, block=4)
    logits, cache = _forward(model, tiny_params, cache, padded, 0, 11, 0)
    outs.append(np.asarray(logits[:11]))
  # Padding only changes the shape of masked reductions: float32 rounding, nothing more.
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)


def test_kv_reads_follow_filled_length():
  cfg = PRESETS["gemma3_270m"]
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 1, 32768))
  local = [l for l in cache.layers if l.window is not None]
  assert all(l.k.shape[1] == 512 for l in local), "sliding-window layers keep only their window"
  per_pos = 2 * 256 * 4  # K and V, 1 kv head of 256 float32s
  for n in (256, 1024, 8192, 32768):
    # 15 local layers read min(n, 512) positions, 3 global layers read n: linear in n.
    assert cache_lib.cache_bytes_read(cache, n) == (15 * min(n, 512) + 3 * n) * per_pos
  # Between block boundaries: whole blocks of 256 as XLA's attention reads them, or the
  # filled positions alone (the least a step can read).
  assert cache_lib.cache_bytes_read(cache, 300) == (15 * 512 + 3 * 512) * per_pos
  assert cache_lib.cache_bytes_read(cache, 300, whole_blocks=False) == 18 * 300 * per_pos


def test_gemma3_270m_preset_shapes_without_allocating():
  cfg = get_config("gemma3_270m")
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.ffn_dim, cfg.sliding_window, cfg.max_context) == (
              262144, 640, 18, 4, 1, 256, 2048, 512, 32768)
  assert [i for i, g in enumerate(cfg.is_global) if g] == [5, 11, 17]
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == cfg.num_params
  assert 260e6 < cfg.num_params < 280e6
  assert shapes["layer_0"]["attn"]["q"].shape == (4, 256, 640)
  axes = logical_axes(cfg)
  assert tuple(axes["embedder"]["embedding"]) == ("vocab", "embed")


def test_config_validation_and_json_roundtrip(tiny_config):
  assert type(tiny_config).from_json(tiny_config.to_json()) == tiny_config
  # The JSON of checkpoints written before embedding_layout replaced embedding_transposed.
  fields = json.loads(tiny_config.to_json())
  del fields["embedding_layout"]
  old = dict(fields, embedding_transposed=False)
  assert type(tiny_config).from_json(json.dumps(old)) == tiny_config
  assert type(tiny_config).from_json(json.dumps(dict(fields, embedding_transposed=True))) == (
      tiny_config.replace(embedding_layout="DV"))
  with pytest.raises(ValueError, match="embedding_layout"):
    tiny_config.replace(embedding_layout="dv")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    tiny_config.replace(num_heads=3)
  with pytest.raises(ValueError, match="max_context"):
    cache_lib.init_cache(tiny_config, 1, 10**6)
