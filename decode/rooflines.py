"""The machine's rooflines, measured in the run that uses them (decode/benchmark.py).

  * memory: the read bandwidth of a large reduction (numpy's one thread, a jitted jnp sum
    on XLA's threads; the faster counts);
  * compute: the FLOP/s of a large square jnp matmul, and of the model's MLP shape at the
    row counts a step uses;
  * a batched step's two rooflines in tokens/s and the bound they set together;
  * the TTFT floor's products, timed on the model's own weights.

The machine's own rooflines (bandwidth, square matmul) are the fastest of several calls:
on this shared machine other work only ever slows a call down. The model-shaped timings
(MLP rows, prefill products) are medians, like the figures they are compared with.
"""

from __future__ import annotations

import time

import numpy as np


def _times(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def median_time(fn, repeats):
  return float(np.median(_times(fn, repeats)))


def best_time(fn, repeats):
  """The fastest of `repeats` calls: for the rooflines, which are what the machine can
  achieve, and on this shared machine other work only ever slows a call down (run 19's
  square matmul read 206 GFLOP/s as a median of 5, its 128-row MLP product 347)."""
  return min(_times(fn, repeats))


def memory_bandwidth(nbytes: int, repeats: int = 9) -> dict:
  """Bytes/s of a streaming read of a buffer much larger than the caches, two ways.

  numpy's sum reads with one thread; a jitted jnp sum uses XLA's thread pool like the decode
  step does. The roofline takes the faster: the bandwidth the step could actually get.
  """
  import jax
  import jax.numpy as jnp
  a = np.ones(nbytes // 4, np.float32)
  a.sum()
  numpy_bw = nbytes / best_time(a.sum, repeats)
  del a
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  jax_bw = nbytes / best_time(lambda: f(x).block_until_ready(), repeats)
  return {"numpy_sum_GBps": numpy_bw / 1e9, "jax_sum_GBps": jax_bw / 1e9,
          "memory_bandwidth_GBps": max(numpy_bw, jax_bw) / 1e9}


def matmul_flops(n: int, repeats: int = 9) -> float:
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  return 2 * n ** 3 / best_time(lambda: f(x).block_until_ready(), repeats)


def bandwidth_bytes(smoke: bool) -> int:
  """The buffer memory_bandwidth reads: far larger than the caches, except in smoke mode."""
  return 2**27 if smoke else 2**30


def rooflines(smoke: bool) -> dict:
  """One reading of both rooflines: memory_bandwidth's figures and matmul_GFLOPs."""
  out = memory_bandwidth(bandwidth_bytes(smoke))
  out["matmul_GFLOPs"] = matmul_flops(256 if smoke else 2048) / 1e9
  return out


def batched_rooflines(weight_bytes: int, kv_bytes_per_slot: int, slots: int,
                      bandwidth_GBps: float, matmul_GFLOPs: float, num_params: int) -> dict:
  """The two rooflines of a decode step of `slots` slots, in tokens/s, and the bound they
  set together on throughput / compute roofline.

  A step makes one token per slot, reads every weight once and each slot's KV in use
  (memory), and does 2 * num_params FLOPs per token (compute). No implementation beats the
  lower of the two, so the highest throughput / compute-roofline ratio any code can reach
  here is min(memory, compute) / compute. With float32 weights (4 bytes a parameter) and
  no KV that is at most slots / 2 * bandwidth / FLOP rate, at 16 slots 8 * bandwidth / FLOP
  rate: below 0.7 wherever the FLOP rate is over 11.4 x the bandwidth in bytes/s (AMD Zen
  5, run 24: 447 GFLOP/s, 38.9 GB/s, 0.696).
  """
  memory = slots * bandwidth_GBps * 1e9 / (weight_bytes + slots * kv_bytes_per_slot)
  compute = matmul_GFLOPs * 1e9 / (2 * num_params)
  lower = min(memory, compute)
  return {"memory_tokens_per_s": memory, "compute_tokens_per_s": compute,
          "lower_tokens_per_s": lower, "bound_over_compute": lower / compute}


def matmul_flops_by_rows(rows, k: int, n: int, repeats: int = 9) -> dict:
  """FLOP/s of an output-major [n, k] weight times `rows` rows, the model's MLP shape.

  A decode step at batch B multiplies B rows by each weight; prefill multiplies the chunk's
  rows. Small row counts cannot reach the big-matmul peak, which bounds batched throughput.
  Each count is timed in both forms the model could use (w @ x^T and x @ w^T); the faster
  counts, as a roofline should.
  """
  import jax
  import jax.numpy as jnp
  w = jnp.ones((n, k), jnp.float32)
  forms = [jax.jit(lambda x, w: w @ x.T), jax.jit(lambda x, w: x @ w.T)]
  out = {}
  for m in rows:
    x = jnp.ones((m, k), jnp.float32)
    best = float("inf")
    for f in forms:
      f(x, w).block_until_ready()
      best = min(best, median_time(lambda: f(x, w).block_until_ready(), repeats))
    out[m] = 2 * m * k * n / best / 1e9
  return out


def prefill_products_time(params, rows: int = 128, repeats: int = 7) -> float:
  """Seconds for every product of a `rows`-token prefill chunk, on the model's own weights,
  in the model's own form (transformer._matmul), with nothing else in the program.

  The products are what a float32 prefill cannot do without; timing them on the real
  weights, one after another as the layers run, gives the TTFT floor the same cache
  and threading conditions as the prefill (a microbenchmark re-reading one warm weight
  read 144-260 GFLOP/s at 128 rows from run to run here).
  """
  import jax
  import jax.numpy as jnp
  from model.quantize import REDUCE_AXES
  from model.transformer import _linear
  weights, num_in = [], []  # each weight with its count of contracted (trailing) axes
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = getattr(path[-1], "key", None)
    if name in REDUCE_AXES and name != "embedding":
      weights.append(w)
      num_in.append(len(REDUCE_AXES[name]))

  @jax.jit
  def products(ws):
    total = jnp.zeros((), jnp.float32)
    for w, n in zip(ws, num_in):  # each input depends on the last output, like the layers'
      x = jnp.full((rows, *w.shape[w.ndim - n:]), 1e-3, jnp.float32) + total * 1e-9
      total = total + _linear(x, w, n, jnp.float32).reshape(-1)[0]
    return total

  products(weights).block_until_ready()
  return median_time(lambda: products(weights).block_until_ready(), repeats)
