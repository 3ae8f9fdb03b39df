"""Peer baseline: llama.cpp (through llama-cpp-python) on the GGUF file itself.

Used by `python -m decode.benchmark --peer` when `llama_cpp` imports (`pip install
llama-cpp-python`, which builds llama.cpp from source: several minutes on two cores). It
runs the quantized Q4_K_M file our weights are dequantized from, so it is the figure for the
int8 target ("int8 TPOT at or below llama.cpp's on the same machine"), measured in the same
run as ours. Greedy decoding, batch 1, as many threads as this process may use.
"""

from __future__ import annotations

import os
import time

import numpy as np


def measure(gguf_path, prompt_ids, new_tokens: int, rounds: int = 3) -> dict:
  """Prompt evaluation time and the median / p90 time per greedy token, over `rounds`
  rounds after a warm-up round; the greedy ids of the last round."""
  from llama_cpp import Llama
  threads = len(os.sched_getaffinity(0))
  llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt_ids) + new_tokens + 8,
              n_threads=threads, n_batch=512, verbose=False)
  prefill, gaps, ids = [], [], []
  for r in range(rounds + 1):
    llm.reset()
    t = time.perf_counter()
    llm.eval(list(prompt_ids))
    elapsed = time.perf_counter() - t
    ids, steps = [llm.sample(temp=0.0)], []  # temperature 0: llama.cpp's greedy sampler
    for _ in range(new_tokens - 1):
      t = time.perf_counter()
      llm.eval([ids[-1]])
      ids.append(llm.sample(temp=0.0))
      steps.append(time.perf_counter() - t)
    if r:  # the first round is the warm-up
      prefill.append(elapsed)
      gaps.extend(steps)
  return {"llama_cpp_prompt_s": float(np.median(prefill)),
          "llama_cpp_tpot_median_s": float(np.median(gaps)),
          "llama_cpp_tpot_p90_s": float(np.percentile(gaps, 90)),
          "llama_cpp_threads": threads, "llama_cpp_greedy_ids": ids}
