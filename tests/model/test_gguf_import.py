"""GGUF -> param tree: structure, layouts, the norm fix-up and the config check."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from model import gguf_import
from model.config import PRESETS


class _Field:
  def __init__(self, value):
    self.value = value
    self.data = value if isinstance(value, list) else [0]

  def contents(self):
    return self.value


def _metadata(config, **overrides):
  values = {
      "general.architecture": "gemma3",
      "gemma3.context_length": config.max_context,
      "gemma3.embedding_length": config.d_model,
      "gemma3.block_count": config.num_layers,
      "gemma3.feed_forward_length": config.ffn_dim,
      "gemma3.attention.head_count": config.num_heads,
      "gemma3.attention.head_count_kv": config.num_kv_heads,
      "gemma3.attention.key_length": config.head_dim,
      "gemma3.attention.value_length": config.head_dim,
      "gemma3.attention.layer_norm_rms_epsilon": float(np.float32(config.rms_eps)),
      "gemma3.rope.freq_base": config.rope_base_global,
      "gemma3.attention.sliding_window": config.sliding_window,
      "tokenizer.ggml.tokens": ["x"] * config.vocab_size,
  }
  values.update(overrides)
  return {k: _Field(v) for k, v in values.items()}


def _fake_reader(config, rng):
  """A GGUFReader stand-in with F32 tensors in GGUF (HF, (out, in)) layout."""
  d, n, k, h, f = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.ffn_dim)
  shapes = {"token_embd": (config.vocab_size, d), "output_norm": (d,)}
  for i in range(config.num_layers):
    shapes.update({f"blk.{i}.{name}": s for name, s in {
        "attn_norm": (d,), "attn_q": (n * h, d), "attn_k": (k * h, d), "attn_v": (k * h, d),
        "attn_output": (d, n * h), "attn_q_norm": (h,), "attn_k_norm": (h,),
        "post_attention_norm": (d,), "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d),
        "ffn_down": (d, f), "post_ffw_norm": (d,)}.items()})
  tensors = [types.SimpleNamespace(name=name + ".weight", tensor_type=GGMLQuantizationType.F32,
                                   data=rng.standard_normal(s).astype(np.float32))
             for name, s in shapes.items()]
  return types.SimpleNamespace(tensors=tensors, fields=_metadata(config)), {
      t.name: t.data for t in tensors}


def test_layouts_and_norm_shift_on_fake_tensors():
  config = PRESETS["tiny"]
  reader, raw = _fake_reader(config, np.random.default_rng(0))
  calls = []
  params = gguf_import.params_from_reader(reader, config, progress=lambda *a: calls.append(a))
  assert len(calls) == len(reader.tensors) and calls[-1][:2] == (len(calls), len(calls))
  h = config.head_dim
  attn, mlp = params["layer_1"]["attn"], params["layer_1"]["mlp"]
  wq, wk, wo = raw["blk.1.attn_q.weight"], raw["blk.1.attn_k.weight"], raw["blk.1.attn_output.weight"]
  # Flat head widths are head-major: row n*H + h of the (out, in) weight.
  np.testing.assert_array_equal(attn["q"][3, 5, :], wq[3 * h + 5])
  np.testing.assert_array_equal(attn["k"][1, 7, :], wk[1 * h + 7])
  np.testing.assert_array_equal(attn["o"][:, 2, 9], wo[:, 2 * h + 9])
  np.testing.assert_array_equal(mlp["gate"], raw["blk.1.ffn_gate.weight"])
  np.testing.assert_array_equal(mlp["down"], raw["blk.1.ffn_down.weight"])
  np.testing.assert_array_equal(params["embedder"]["embedding"], raw["token_embd.weight"])
  np.testing.assert_array_equal(attn["q_norm"]["scale"], raw["blk.1.attn_q_norm.weight"] - 1)
  np.testing.assert_array_equal(params["final_norm"]["scale"], raw["output_norm.weight"] - 1)


def test_missing_or_unknown_tensor_raises():
  config = PRESETS["tiny"]
  reader, _ = _fake_reader(config, np.random.default_rng(0))
  reader.tensors = [t for t in reader.tensors if t.name != "blk.2.ffn_up.weight"]
  with pytest.raises(ValueError, match="layer_2/mlp/up"):
    gguf_import.params_from_reader(reader, config, progress=False)
  reader.tensors[0].name = "blk.0.mystery.weight"
  with pytest.raises(ValueError, match="mystery"):
    gguf_import.params_from_reader(reader, config, progress=False)


def test_config_from_metadata():
  expected = PRESETS["gemma3_270m"]
  assert gguf_import.config_from_metadata(_metadata(expected)) == expected
  with pytest.raises(ValueError, match=r"num_layers: gguf=26 expected=18.*ffn_dim"):
    gguf_import.config_from_metadata(_metadata(expected, **{
        "gemma3.block_count": 26, "gemma3.feed_forward_length": 4096}))
  tiny = PRESETS["tiny"]
  assert gguf_import.config_from_metadata(_metadata(tiny), expected=None).d_model == tiny.d_model


@pytest.mark.slow
def test_real_tree_structure_dtype_and_count(gemma_gguf):
  config, params, _ = gemma_gguf
  assert config == PRESETS["gemma3_270m"]
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes == gguf_import.expected_shapes(config)
  leaves = jax.tree.leaves(params)
  assert {x.dtype for x in leaves} == {np.dtype(np.float32)}
  assert sum(x.size for x in leaves) == config.num_params
  assert all(np.isfinite(x).all() for x in leaves)


@pytest.mark.slow
def test_real_norm_scales_are_bfloat16_after_unshift(gemma_gguf):
  # The released weights are bfloat16; the converter added 1 in float32. Only the unshifted
  # scales are all exactly bf16 (the raw +1 values are not), which pins the convention down.
  _, params, _ = gemma_gguf
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  scales = np.concatenate([x for path, x in flat if jax.tree_util.keystr(path).endswith("['scale']")])
  assert (scales.view(np.uint32) & 0xFFFF == 0).all()
  assert ((scales + 1).view(np.uint32) & 0xFFFF != 0).mean() > 0.1
