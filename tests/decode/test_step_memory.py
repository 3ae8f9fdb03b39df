"""The compiled decode step touches no weight-sized temporary memory.

Calling a jitted step once per token is only as cheap as the fused loop if XLA does not
re-lay-out (copy/transpose) weights or copy the KV cache on every call. These tests read
the compiled program: they fail if a change makes XLA materialise any parameter- or
cache-sized buffer per step. Gemma 3 270M dimensions, 2 layers, small vocabulary.
"""

import re

import jax
import numpy as np
import pytest

from decode import steps
from model import native
from model.cache import init_cache
from model.config import get_config
from model.quantize import with_quant
from model.transformer import Transformer, init_params, layout_embedding

_BIG = 1 << 20  # bytes; the smallest weight here is 640 x 1024 x 4 = 2.6 MB


@pytest.fixture(scope="module", params=[(1, "none"), (4, "none"), (1, "int8_dynamic"),
                                        (4, "int8_dynamic"), (1, "int8_native"),
                                        (4, "int8_native"), (1, "native"), (4, "native"),
                                        (1, "bfloat16"), (4, "bfloat16"), (1, "DV"), (4, "DV"),
                                        (1, "packed"), (4, "packed")],
                ids=lambda p: f"{p[0]}_slots_{p[1]}")
def compiled(request):
  """One slot takes the matrix-vector path of every matmul, several the weight-left one;
  int8_dynamic and bfloat16 weights must be multiplied as stored, never as a float32 copy.
  DV holds the embedding [D,V] (a one-slot engine's layout on CPU without the kernels' float32
  rows): the lookup and the head must read it as it is, not through a [V,D] copy. native and int8_native are float32 and
  int8_dynamic with the native CPU kernels (model/native.py): attention reads the cache in
  place, and int8_native's few-row products run in the int8 kernel. packed is native with
  the embedding packed for the native head: its lookup must not copy the table either."""
  slots, quant = request.param
  cfg = get_config("gemma3_270m", num_layers=2, global_every=2, vocab_size=4096)
  params = init_params(cfg, jax.random.key(0))
  weights = sum(x.nbytes for x in jax.tree.leaves(params))  # the float32 model's bytes
  if quant == "bfloat16":
    cfg, params = cfg.replace(param_dtype=quant), jax.tree.map(lambda x: x.astype(quant), params)
  elif quant == "DV":
    cfg, params = layout_embedding(cfg, params, "DV")
  elif quant in ("native", "int8_native", "packed"):
    if native.unsupported_here():
      pytest.skip(f"native kernels: {native.unsupported_here()}")
    if quant == "int8_native":
      cfg, params = with_quant(cfg, params, "int8_dynamic")
    cfg = cfg.replace(native_kernels=True)
    if quant == "packed":
      cfg, params = layout_embedding(cfg, params, "packed")
  elif quant != "none":
    cfg, params = with_quant(cfg, params, quant)
  state = steps.init_state(init_cache(cfg, slots, 2048))
  model = Transformer(cfg)
  fn = jax.jit(lambda p, s: steps.decode_step(model, p, s, 0), donate_argnums=1)
  program = fn.lower(params, state).compile()
  # The kernels are in the step exactly when asked for (int8 for the row counts it takes on
  # this instruction set: 1..4 with AVX-512, 1 with AVX2).
  assert (native.INT8_TARGET in program.as_text()) == (quant == "int8_native"
                                                       and slots <= native.max_int8_rows())
  assert (native.ATTENTION_TARGET in program.as_text()) == (quant.endswith("native")
                                                            or quant == "packed")
  assert (native.PACKED_TARGET in program.as_text()) == (quant == "packed")
  return program, weights, params


def _big_materialised(hlo: str):
  found = []
  for line in hlo.splitlines():
    m = re.match(r"\s*%\S+ = f32\[([0-9,]*)\]\S* (copy|transpose)\(", line)
    if m and 4 * np.prod([int(d) for d in m.group(1).split(",") if d] or [1]) >= _BIG:
      found.append(line.strip()[:160])
  return found


def _unfused_lines(hlo: str):
  """Instructions that own a buffer: every computation but the bodies of fusions, whose
  values live in registers (e.g. an embedding row converted as it is sliced)."""
  fused = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", hlo))
  skip = False
  for line in hlo.splitlines():
    if line and not line[0].isspace():
      skip = line.split(" ")[0] in fused
    elif not skip:
      yield line


def test_no_weight_or_cache_copies_per_step(compiled):
  program, _, _ = compiled
  assert _big_materialised(program.as_text()) == []


def test_low_precision_weights_are_never_converted_to_float32(compiled):
  """No float32 buffer the shape of an int8 or bfloat16 weight: the matmuls read the stored
  bytes (a converted copy would be written, and read again, on every step)."""
  program, _, params = compiled
  shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves(params)
            if x.dtype != np.float32 and x.size >= 1 << 16}
  found = [line.strip()[:160] for line in _unfused_lines(program.as_text())
           if (m := re.match(r"\s*%\S+ = f32\[([0-9,]*)\]", line)) and m.group(1) in shapes]
  assert found == []


def test_temporary_memory_is_small_next_to_weights(compiled):
  program, weights, _ = compiled
  temp = program.memory_analysis().temp_size_in_bytes
  assert temp < 0.05 * weights, (temp, weights)


def test_cache_is_updated_in_place(compiled):
  program, _, _ = compiled
  ma = program.memory_analysis()
  # Everything the step returns (the state, bar the small packed rows) aliases its inputs.
  assert ma.alias_size_in_bytes >= 0.99 * ma.output_size_in_bytes
