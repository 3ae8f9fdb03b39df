"""The rooflines' arithmetic (decode/rooflines.py); the measurements themselves run in the
benchmark's smoke test."""

import pytest

from decode.rooflines import batched_rooflines


def test_batched_rooflines_bound_the_ratio_to_the_compute_roofline():
  """Memory roofline of a batched step and the bound on throughput / compute roofline: with
  float32 weights at 16 slots, 8 x bandwidth / FLOP rate (AMD Zen 5, run 24: just under 0.7)."""
  params = 268_098_176
  out = batched_rooflines(4 * params, 0, 16, 38.87, 447.0, params)
  assert out["memory_tokens_per_s"] == pytest.approx(16 * 38.87e9 / (4 * params))
  assert out["compute_tokens_per_s"] == pytest.approx(447e9 / (2 * params))
  assert out["bound_over_compute"] == pytest.approx(8 * 38.87 / 447) and \
      out["bound_over_compute"] < 0.7
  # KV adds bytes per slot; a machine whose bandwidth is plentiful is bound by compute.
  with_kv = batched_rooflines(4 * params, 10**7, 16, 38.87, 447.0, params)
  assert with_kv["memory_tokens_per_s"] < out["memory_tokens_per_s"]
  assert batched_rooflines(4 * params, 0, 16, 1000.0, 447.0, params)["bound_over_compute"] == 1.0
