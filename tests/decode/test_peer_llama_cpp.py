"""The llama.cpp peer (decode/peer_llama_cpp.py) on the real GGUF file, where llama-cpp-python
is installed (it is optional: the benchmark's --peer runs it only then)."""

import json
from pathlib import Path

import pytest

from decode import peer_llama_cpp
from decode.benchmark import _common_prefix

REFERENCE = Path(__file__).parents[3] / "shared" / "reference" / "gemma3_270m_hf.json"


def test_common_prefix():
  assert _common_prefix([1, 2, 3], [1, 2, 4]) == 2
  assert _common_prefix([1, 2], [1, 2, 3]) == 2
  assert _common_prefix([5], [1]) == 0


def test_a_failing_peer_raises_and_says_how_it_ended(tmp_path):
  """The child process's failure (here: no such file, or llama_cpp not installed) comes back
  as a RuntimeError with its exit code and the end of its stderr, not as a dead benchmark."""
  with pytest.raises(RuntimeError, match=r"llama.cpp peer failed \(exit code \d+\): .+"):
    peer_llama_cpp.measure_in_subprocess(tmp_path / "missing.gguf", [2, 3], 2, rounds=1)


@pytest.mark.slow
def test_llama_cpp_greedy_continuations_start_like_the_reference():
  """llama.cpp on the Q4_K_M file is a peer on the same model: its first four greedy tokens
  are the reference's (float32 on the dequantized weights) for at least 6 of the 8 reference
  prompts (measured: 7; on "json" the quantized dot products pick another first token). Its
  timings are sane."""
  pytest.importorskip("llama_cpp")
  from model.gguf_import import default_gguf_path
  ref = json.loads(REFERENCE.read_text())["prompts"]
  same, out = 0, {}
  for p in ref:
    out = peer_llama_cpp.measure_in_subprocess(default_gguf_path(), p["ids"], 4, rounds=1)
    same += out["llama_cpp_greedy_ids"] == p["greedy_ids"][:4]
  assert same >= 6, same
  assert 0 < out["llama_cpp_forward_median_s"] <= out["llama_cpp_tpot_median_s"]
  assert out["llama_cpp_tpot_median_s"] <= out["llama_cpp_tpot_p90_s"] < 10
  assert out["llama_cpp_prompt_s"] > 0 and out["llama_cpp_threads"] >= 1
