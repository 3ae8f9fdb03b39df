"""Peer baseline: llama.cpp (through llama-cpp-python) on the GGUF file itself.

Used by `python -m decode.benchmark --peer` when `llama_cpp` imports (`pip install
llama-cpp-python`, which builds llama.cpp from source: several minutes on two cores). It
runs the quantized Q4_K_M file our weights are dequantized from, so it is the figure for the
int8 target ("int8 TPOT at or below llama.cpp's on the same machine"), measured in the same
run as ours. Greedy decoding, batch 1, as many threads as this process may use.

The benchmark calls it through `measure_in_subprocess`: llama.cpp is native code built on the
user's machine, and a crash there (seen here: its AMX matmul segfaulted on an AMX CPU under
KVM when built with GGML_NATIVE) must cost the peer's figures only, not the whole run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np


def measure(gguf_path, prompt_ids, new_tokens: int, rounds: int = 3) -> dict:
  """Prompt evaluation time and the median / p90 time per greedy token, over `rounds`
  rounds after a warm-up round; the greedy ids of the last round."""
  from llama_cpp import Llama
  threads = len(os.sched_getaffinity(0))
  llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt_ids) + new_tokens + 8,
              n_threads=threads, n_batch=512, verbose=False)
  prefill, gaps, evals, ids = [], [], [], []
  for r in range(rounds + 1):
    llm.reset()
    t = time.perf_counter()
    llm.eval(list(prompt_ids))
    elapsed = time.perf_counter() - t
    ids, steps, forward = [llm.sample(temp=0.0)], [], []  # temperature 0: greedy
    for _ in range(new_tokens - 1):
      t = time.perf_counter()
      llm.eval([ids[-1]])
      t_eval = time.perf_counter()
      ids.append(llm.sample(temp=0.0))
      steps.append(time.perf_counter() - t)
      forward.append(t_eval - t)
    if r:  # the first round is the warm-up
      prefill.append(elapsed)
      gaps.extend(steps)
      evals.extend(forward)
  # The token-to-token time includes the binding's sampler (~1 ms here, mostly Python);
  # the forward pass alone is the stricter figure to compare with.
  return {"llama_cpp_prompt_s": float(np.median(prefill)),
          "llama_cpp_tpot_median_s": float(np.median(gaps)),
          "llama_cpp_tpot_p90_s": float(np.percentile(gaps, 90)),
          "llama_cpp_forward_median_s": float(np.median(evals)),
          "llama_cpp_threads": threads, "llama_cpp_greedy_ids": ids}


def measure_in_subprocess(gguf_path, prompt_ids, new_tokens: int, rounds: int = 3,
                          timeout_s: float = 900) -> dict:
  """`measure` in a child process. Raises RuntimeError saying how the child ended (exit
  code or signal, the end of its stderr) when it does not return figures."""
  request = json.dumps({"gguf_path": str(gguf_path), "prompt_ids": [int(i) for i in prompt_ids],
                        "new_tokens": int(new_tokens), "rounds": int(rounds)})
  try:
    done = subprocess.run([sys.executable, "-m", "decode.peer_llama_cpp"], input=request,
                          capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"llama.cpp peer: no answer within {timeout_s:.0f} s") from e
  if done.returncode != 0:
    how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
           else f"exit code {done.returncode}")
    raise RuntimeError(f"llama.cpp peer failed ({how}): {done.stderr.strip()[-600:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  args = json.loads(sys.stdin.read())
  print(json.dumps(measure(args["gguf_path"], args["prompt_ids"], args["new_tokens"],
                           args["rounds"])))
