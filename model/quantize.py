"""int8 weights: symmetric, one float32 scale per output channel.

For a weight contracted over `REDUCE_AXES[name]`, every output channel c gets
  scale_c = max |w[c, ...]| / 127,   q = round(w / scale_c)  in [-127, 127],
so dequantized weights are within scale_c / 2 of the originals. The embedding doubles as
the output head, whose output channels are vocabulary rows: it gets one scale per row.
Norm scales stay float32 (they are tiny and numerically sensitive).

Both int8 modes (config `quant`: "int8", weight-only, and "int8_dynamic", int8 activations
too) store exactly this param tree; the model decides how to multiply with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# Weights are output-major (model/transformer.py), so the contracted axes come last.
REDUCE_AXES = {"q": (2,), "k": (2,), "v": (2,), "o": (1, 2), "gate": (1,), "up": (1,),
               "down": (1,), "embedding": (1,)}


def quantize_weight(w, axes):
  w = jnp.asarray(w, jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def quantize_int8(params: dict) -> dict:
  """Float params -> the param tree of the same model with `quant="int8"`."""
  out = {}
  for name, value in params.items():
    if isinstance(value, dict):
      out[name] = quantize_int8(value)
    elif name in REDUCE_AXES:
      out[name], out[name + "_scale"] = quantize_weight(value, REDUCE_AXES[name])
    else:
      out[name] = value
  return out


quantize_int8_jit = jax.jit(quantize_int8)


def with_quant(config, params: dict, quant: str):
  """(config, params) of the same model stored as `quant` ("int8" or "int8_dynamic"), from
  float params. config.replace checks the name."""
  return config.replace(quant=quant), quantize_int8_jit(params)
