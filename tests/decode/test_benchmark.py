"""The benchmark runs end to end in smoke mode (tiny model); structure and sanity, not speed."""

import json
import math
import subprocess
import sys
import types

import pytest

from model import native

RATIOS = ("tpot_over_roofline", "stream_over_fused", "throughput16_over_compute_roofline",
          "tpot_ctx8192_over_ctx256", "compiles_after_warmup")


def test_smoke_run_writes_ratios_and_sane_figures(tmp_path):
  out = tmp_path / "bench.json"
  variants = "int8_dynamic,float32_VD,int8_dynamic_xla"
  packed = native.available()  # the native kernels, the packed head among them, run here
  if packed:
    variants += ",float32_packed"
  proc = subprocess.run(
      [sys.executable, "-m", "decode.benchmark", "--config=configs/tiny.py", "--smoke",
       "--slots=1,4", f"--variants={variants}", f"--out={out}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "TPOT / roofline" in proc.stdout
  result = json.loads(out.read_text())
  for key in RATIOS[:4]:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result["compiles_after_warmup"] == 0
  assert result["stream_equals_fused"] is True
  assert result["memory_bandwidth_GBps"] > 0.1 and result["matmul_GFLOPs"] > 0.1
  # Each roofline is read at the start and the end of the run; the higher reading counts.
  assert len(result["memory_bandwidth_GBps_readings"]) == 2
  readings = result["matmul_GFLOPs_readings"]
  assert len(readings) == 2 and result["matmul_GFLOPs"] == max(readings) > 0
  # The bandwidth is also read around the latency runs, a diagnostic; the TPOT's roofline
  # takes the best of all four readings.
  around = result["memory_bandwidth_at_tpot_GBps_readings"]
  assert len(around) == 2 and result["memory_bandwidth_at_tpot_GBps"] == max(around) > 0
  assert result["memory_bandwidth_GBps"] == max(
      *result["memory_bandwidth_GBps_readings"], *around)
  assert result["roofline_tpot_s"] == pytest.approx(
      result["step_bytes"] / (result["memory_bandwidth_GBps"] * 1e9))
  assert result["tpot_over_roofline_at_tpot"] == pytest.approx(
      result["tpot_median_s"] * result["memory_bandwidth_at_tpot_GBps"] * 1e9
      / result["step_bytes"])
  # The smoke run measures 1 and 4 slots: the batched rooflines are those of its 4 slots,
  # whose step reads every weight and some KV once for 4 tokens.
  assert result["throughput16_slots"] == 4
  memory4 = result["throughput16_memory_roofline_tokens_per_s"]
  bandwidth = result["memory_bandwidth_GBps"] * 1e9
  assert 4 * bandwidth / (result["weight_bytes"] * 1.5) < memory4 < 4 * bandwidth / result[
      "weight_bytes"]
  compute = result["compute_roofline_tokens_per_s"]
  assert result["throughput16_bound_over_compute_roofline"] == pytest.approx(
      min(memory4, compute) / compute)
  assert result["throughput16_over_roofline"] == pytest.approx(
      result["throughput_tokens_per_s"]["4"] / min(memory4, compute))
  # The one-slot float32 engine on CPU holds the table [D,V] for XLA's one-row head.
  assert result["embedding_layout"] == ("DV" if result["backend"] == "cpu" else "VD")
  assert set(result["throughput_tokens_per_s"]) == {"1", "4"}
  assert list(result["throughput_sampled_tokens_per_s"]) == ["4"]
  assert result["throughput_sampled_tokens_per_s"]["4"] > 0
  assert set(result["mlp_matmul_GFLOPs_by_rows"]) == {"1", "16", "128"}
  assert 0 < result["prefill_128_products_s"] < result["floor_ttft_128_s"] < 10
  times = result["compile_times_s"]
  assert {"decode_step", "prefill_16", "prefill_256_chunk", "warmup_all_buckets_s"} <= set(times)
  assert all(v > 0 for v in times.values())
  assert 0 < result["tpot_median_s"] <= result["tpot_p90_s"]
  assert set(result["tpot_by_context_s"]) == {"16", "64"}
  v = result["variants"]["int8_dynamic"]
  assert 0 < v["weight_bytes"] < result["weight_bytes"] / 2  # int8 + scales vs float32
  assert 0 < v["roofline_tpot_s"] < result["roofline_tpot_s"]
  assert v["tpot_over_float32"] > 0 and v["ttft_over_float32"] > 0
  assert v["throughput16_tokens_per_s"] > 0
  kernels = native.unsupported_here() is None  # "auto" uses the native kernels where they run
  assert result["native_kernels"] is kernels and v["native_kernels"] is kernels
  assert result["native_isa"] == (native.isa() if kernels else None)
  assert isinstance(result["cpu_model"], str) and result["cpu_model"]
  xla = result["variants"]["int8_dynamic_xla"]  # the same model with XLA's code throughout
  assert xla["native_kernels"] is False and xla["weight_bytes"] == v["weight_bytes"]
  assert "throughput16_tokens_per_s" not in xla
  vd = result["variants"]["float32_VD"]  # same weights, the one-slot engine's table as stored
  assert vd["weight_bytes"] == result["weight_bytes"] and vd["tpot_over_float32"] > 0
  assert "throughput16_tokens_per_s" not in vd
  if packed:
    vp = result["variants"]["float32_packed"]
    assert vp["weight_bytes"] == result["weight_bytes"] and vp["tpot_over_float32"] > 0
    assert "throughput16_tokens_per_s" not in vp


def test_tpot_pools_the_gaps_of_every_stream():
  from decode.benchmark import latency

  class Stream:
    def __init__(self, times):
      self.times, self.first_token_time = times, times[0]

    def __iter__(self):
      return iter(types.SimpleNamespace(time=t) for t in self.times)

  # Two TTFT streams, then two TPOT streams with gaps 1, 1, 4 and 2, 6, 6: alone they
  # give medians of 1 and 6, pooled 3.
  streams = iter([[0.2], [0.3], [0.0, 1.0, 2.0, 6.0], [0.0, 2.0, 8.0, 14.0]])
  engine = types.SimpleNamespace(submit=lambda request: Stream(next(streams)))
  tok = types.SimpleNamespace(encode=lambda text: [5, 6, 7], bos_id=2)
  out = latency(engine, tok, new_tokens=4, prompt_lens=[8], repeats=2)
  assert out["ttft_8_s"] == pytest.approx(0.25)
  assert out["tpot_median_s"] == pytest.approx(3.0)
  assert out["tpot_p90_s"] == pytest.approx(6.0)
  assert next(streams, None) is None  # exactly repeats streams for TTFT and for TPOT
