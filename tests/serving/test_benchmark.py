"""`python -m serving.benchmark` against the tiny server: both load modes, JSON and PNG out.

Only the bookkeeping is checked (counts, token totals, ordered percentiles), never speed."""

import json
import subprocess
import sys

import pytest

from tests.serving.conftest import REPO


@pytest.mark.parametrize("mode", [["--concurrency=4"], ["--rate=40"]], ids=["fixed", "poisson"])
def test_benchmark_writes_json_and_plot(tiny_server, tmp_path, mode):
  out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
  proc = subprocess.run(
      [sys.executable, "-m", "serving.benchmark", f"--url={tiny_server.url}", *mode,
       "--num_requests=12", "--max_tokens=8", "--prompt_words=6", "--duration=120",
       f"--out={out}", f"--plot={plot}"],
      cwd=REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["completed"] == 12 and result["failed"] == 0
  assert result["total_output_tokens"] == 12 * 8
  assert result["config"]["mode"] == ("poisson" if "--rate=40" in mode else "concurrency")
  for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
    p = result[key]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"], key
  assert all(len(r["token_times"]) == 8 for r in result["requests"])  # one chunk per token
  assert 0 <= result["goodput_requests_per_s"] <= result["request_throughput"]
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
  assert json.loads(proc.stdout)["completed"] == 12
