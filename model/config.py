"""Model configuration: one frozen dataclass, presets as data, derived values as properties.

The presets describe the Gemma 3 architecture family. `gemma3_270m` matches the published
checkpoint exactly; `tiny` keeps every architectural feature (GQA, sliding window + global
layers, QK-norm, pre/post norms) at a size that compiles and runs in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
QUANT_MODES = ("none", "int8", "int8_dynamic")
EMBEDDING_LAYOUTS = ("VD", "DV", "packed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Dimensions and numerics of a Gemma 3 style decoder.

  Attributes:
    vocab_size: rows of the (tied) embedding table.
    d_model: residual stream width (D).
    num_layers: number of transformer blocks.
    num_heads: query heads (N).
    num_kv_heads: key/value heads (K); N must be a multiple of K (GQA/MQA).
    head_dim: per-head width (H).
    ffn_dim: hidden width of the GeGLU MLP (F).
    sliding_window: keys a local layer may see, counting the query itself.
    global_every: every `global_every`-th layer (1-based) attends globally.
    rope_base_local / rope_base_global: RoPE wavelength base per layer kind.
    max_context: longest sequence the model was trained for.
    query_pre_attn_scalar: queries are scaled by its inverse square root.
    rms_eps: epsilon inside RMSNorm.
    param_dtype / dtype: storage dtype of weights and dtype of activations (names, so the
      config stays hashable and serialisable to JSON). A matmul runs in its weight's dtype:
      with bfloat16 weights and float32 activations, each matmul input is rounded to
      bfloat16 and the product accumulates in float32.
    quant: "int8" stores matmul weights and the embedding as int8 + per-channel scales and
      dequantizes them for float matmuls (weight-only); "int8_dynamic" stores the same params
      and also rounds each activation row to int8 at run time (one scale per row), so the
      matmuls run int8 x int8 -> int32 (model/transformer.py: _matmul_int8).
    embedding_layout: how the tied embedding is held, a run-time layout chosen per compiled
      program set (model/transformer.py: layout_embedding; docs/performance.md): "VD" as
      stored; "DV" input-major, which XLA CPU's one-row head reads ~25% faster, while
      several rows and the lookups are faster from [V,D] (float storage only); "packed",
      blocks of 16 vocabulary rows side by side, [V/16, D, 16], which the native CPU
      kernel's head reads (float32 storage only; the kernel runs whatever native_kernels
      says, since nothing else reads this layout).
    native_kernels: a decode step's attention over a float32 cache, int8_dynamic's
      products of a few rows and float32 products of 2-16 rows (a decode step of several
      slots, a short prefill chunk) run in the native CPU kernels of model/native.py instead of
      XLA's code (the same results up to float32 rounding order; the int8 sums exactly). A
      run-time choice like embedding_layout (EngineConfig.native_kernels resolves it,
      and turns it off for sharded engines: the custom calls have no partitioning rule, so a
      sharded program would run them replicated). A bfloat16 cache keeps XLA's attention.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  sliding_window: int
  global_every: int = 6
  rope_base_local: float = 10_000.0
  rope_base_global: float = 1_000_000.0
  max_context: int = 32768
  query_pre_attn_scalar: float = 256.0
  rms_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"
  quant: str = "none"  # "none", "int8" or "int8_dynamic" (model/quantize.py)
  embedding_layout: str = "VD"  # one of EMBEDDING_LAYOUTS
  native_kernels: bool = False

  def __post_init__(self):
    if self.quant not in QUANT_MODES:
      raise ValueError(f"quant={self.quant!r}; expected one of {QUANT_MODES}")
    if self.embedding_layout not in EMBEDDING_LAYOUTS:
      raise ValueError(f"embedding_layout={self.embedding_layout!r}; expected one of "
                       f"{EMBEDDING_LAYOUTS}")
    if self.embedding_layout != "VD" and self.int8_weights:
      raise ValueError(f"embedding_layout={self.embedding_layout!r} needs float storage; "
                       f"quant={self.quant!r} keeps the embedding [V,D] with one scale per "
                       "vocabulary row")
    if self.embedding_layout == "packed" and self.param_dtype != "float32":
      raise ValueError(f"embedding_layout='packed' needs float32 storage, not "
                       f"{self.param_dtype}: only the native float32 head reads it")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")

  @property
  def int8_weights(self) -> bool:
    """Whether matmul weights and the embedding are stored as int8 + per-channel scales."""
    return self.quant != "none"

  @property
  def is_global(self) -> tuple[bool, ...]:
    """Per layer: True for global attention, False for sliding-window attention."""
    return tuple((i + 1) % self.global_every == 0 for i in range(self.num_layers))

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once: it is tied to the output head)."""
    d, h = self.d_model, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
    mlp = 3 * d * self.ffn_dim
    return self.vocab_size * d + self.num_layers * (attn + mlp + 4 * d) + d

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    fields = json.loads(text)
    # JSON written before embedding_layout holds this flag instead (a checkpoint's is False:
    # checkpoints hold the table [V,D]).
    if "embedding_transposed" in fields:
      fields["embedding_layout"] = "DV" if fields.pop("embedding_transposed") else "VD"
    return cls(**fields)


# Presets. The 270M figure counts the 168M-parameter tied embedding.
PRESETS: dict[str, ModelConfig] = {
    # ~268M params: 262144 x 640 embedding (168M) + 18 blocks (100M).
    "gemma3_270m": ModelConfig(
        vocab_size=262144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, ffn_dim=2048, sliding_window=512, global_every=6,
        rope_base_local=10_000.0, rope_base_global=1_000_000.0, max_context=32768,
        query_pre_attn_scalar=256.0),
    # ~62K params: 2 local + 1 global layer, GQA 4:2, window 8 so tests cross it quickly.
    "tiny": ModelConfig(
        vocab_size=384, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=16, ffn_dim=128, sliding_window=8, global_every=3,
        rope_base_local=10_000.0, rope_base_global=1_000_000.0, max_context=512,
        query_pre_attn_scalar=16.0),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
