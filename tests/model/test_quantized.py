"""Weight-only int8 and bfloat16 storage: quality against float32 on the reference prompts.

Teacher-forced: each reference prompt followed by its reference greedy continuation goes
through one forward pass; at every continuation position we compare the argmax with the
reference's greedy token (float32 reproduces all of them) and the logits with float32.
The thresholds are the measured figures (see docs/performance.md) with a small margin.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quantize import quantize_int8
from tests.model.forward import all_logits

# Measured on the 8 reference prompts x 32 tokens: int8 0.977 (max top-20 logit diff 1.07),
# bfloat16 0.992 (0.06).
INT8_MIN_AGREEMENT = 0.95
BF16_MIN_AGREEMENT = 0.97


def test_int8_roundtrip_error_is_bounded(tiny_params):
  q = quantize_int8(tiny_params)
  w = np.asarray(tiny_params["layer_0"]["mlp"]["gate"])
  deq = np.asarray(q["layer_0"]["mlp"]["gate"], np.float32) * np.asarray(q["layer_0"]["mlp"]["gate_scale"])
  assert q["layer_0"]["mlp"]["gate"].dtype == jnp.int8
  assert q["layer_0"]["mlp"]["gate_scale"].shape == (w.shape[0], 1)  # one per output channel
  assert q["layer_0"]["attn"]["o_scale"].shape == (w.shape[1], 1, 1)  # o: [D, N, H]
  assert np.all(np.abs(deq - w) <= np.asarray(q["layer_0"]["mlp"]["gate_scale"]) / 2 + 1e-7)


def _quality(config, params, reference):
  agree, total, max_diff = 0, 0, 0.0
  for prompt in reference["prompts"]:
    seq = prompt["ids"] + prompt["greedy_ids"]
    logits = all_logits(config, params, seq)
    n = len(prompt["ids"])
    preds = logits[n - 1:len(seq) - 1].argmax(-1)
    agree += int((preds == np.asarray(prompt["greedy_ids"])).sum())
    total += len(prompt["greedy_ids"])
    top = prompt["last_top20"]
    max_diff = max(max_diff, float(np.max(np.abs(logits[n - 1][[i for i, _ in top]] -
                                                  np.array([v for _, v in top])))))
  return agree / total, max_diff


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
def test_low_precision_greedy_agreement(kind, gemma_gguf, reference):
  config, params, _ = gemma_gguf
  if kind == "int8":
    config, params = config.replace(quant="int8"), quantize_int8(params)
    threshold = INT8_MIN_AGREEMENT
  else:
    config = config.replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    threshold = BF16_MIN_AGREEMENT
  agreement, max_diff = _quality(config, params, reference)
  print(f"{kind}: greedy agreement {agreement:.3f}, max top-20 logit diff {max_diff:.3f}")
  assert agreement >= threshold
