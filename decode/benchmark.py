"""Measure flaxstream on this machine, in one run, against rooflines measured in the same run.

  python -m decode.benchmark --config=configs/gemma3_270m.py --out=bench.json
  python -m decode.benchmark --config=configs/tiny.py --smoke     # seconds; used by the tests

What is measured (medians; timings on a shared 2-core CPU are noisy, ratios less so):
  * memory roofline: read bandwidth of a large reduction (numpy and jitted jnp, the faster
    counts); bytes a decode step must read = weights + KV in use; roofline TPOT = bytes /
    bandwidth.
  * compute roofline: FLOP/s of a large jnp matmul; per-token compute roofline for batched
    throughput = FLOP/s / (2 * params). The 16-slot step's memory roofline too (weights and
    16 slots' KV read once for 16 tokens), and the bound the two set together on the
    16-slot / compute-roofline ratio (batched_rooflines).
    Both rooflines are what the machine can achieve: the fastest of several calls, read at
    the start and again at the end of the run, the higher reading counting (both are kept).
    The bandwidth is also read before and after the latency runs (TTFT, then TPOT);
    tpot_over_roofline takes the best of all four readings, and tpot_over_roofline_at_tpot,
    a diagnostic, the better of those two.
  * TTFT for 128/512/2048-token prompts; TPOT median and p90 over the new tokens, batch 1.
  * streaming overhead: generator tokens/s over fused `lax.scan` tokens/s, same tokens.
  * throughput with 1/4/16/32 concurrent greedy slots (one engine per slot count), and with
    16 slots sampling (temperature 0.8, top-p 0.95).
  * matmul FLOP/s at the MLP's shape for 1, 16 and 128 rows; a TTFT floor for a 128-token
    prompt: the prefill's products alone, timed on the model's weights, plus one read of
    the vocabulary head at the measured bandwidth.
  * long context: TPOT at context 256 vs 8192 with the same max_len. The slot's cache is
    filled by one real prefill of a repeated prompt.
  * compile time per program (its first call in warm-up), compiles after warm-up (counted),
    peak RSS.
  * peers (`--peer`, each where installed): Hugging Face transformers on our float32
    params (batch 1 and 16), llama.cpp on the GGUF file (batch 1), and our TPOTs over
    theirs.
  * the same weights stored another way (`--variants`, default int8_dynamic; also int8,
    bfloat16, float32_VD and float32_packed, the one-slot engine's embedding held as
    stored or packed, and
    float32_xla / int8_dynamic_xla, without the native CPU kernels): TTFT 128,
    batch-1 TPOT and 16-slot throughput, each also as a ratio to the float32 figure of the
    same run, since between runs this machine drifts more than the gap.

The top level of the JSON holds the ratios other tools read: tpot_over_roofline,
stream_over_fused, throughput16_over_compute_roofline, tpot_ctx8192_over_ctx256,
compiles_after_warmup.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from decode.rooflines import (bandwidth_bytes, batched_rooflines, matmul_flops_by_rows,
                              memory_bandwidth, prefill_products_time, rooflines)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gemma3_270m.py", "Run config file.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON result here.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A few steps of everything (tests); figures are meaningless.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens per latency run.")
_SLOTS = flags.DEFINE_list("slots", ["1", "4", "16", "32"], "Slot counts for throughput.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["int8_dynamic"],
    "Storage variants measured against float32 in the same run: int8_dynamic, int8, "
    "bfloat16, float32_VD and float32_packed (the one-slot engine holding the embedding "
    "[V,D], as stored, or packed for the native head, instead of auto's [D,V]), "
    "float32_xla and int8_dynamic_xla (without the native CPU kernels of model/native.py).")
_PEER = flags.DEFINE_bool(
    "peer", False, "Also run the installed peers on the same weights: Hugging Face transformers "
    "(torch) and llama.cpp (llama-cpp-python, on the GGUF file).")


def _cpu_model() -> str:
  """The CPU's model name, as /proc/cpuinfo gives it ("unknown" elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown"


def _engine(config, num_slots, max_len=None):
  from decode.build import engine_config
  return engine_config(config, num_slots=num_slots, **({"max_len": max_len} if max_len else {}))


def _prompt(tok, n, seed=0):
  """n ids of ordinary text-like tokens (BOS first)."""
  rng = np.random.RandomState(seed)
  words = tok.encode("the quick brown fox jumps over the lazy dog and streams tokens " * 8)
  return tuple([tok.bos_id] + [int(words[i]) for i in rng.randint(0, len(words), n - 1)])


def latency(engine, tok, new_tokens, prompt_lens, repeats):
  from decode.engine import Request
  out = {}
  for n in prompt_lens:
    ttfts = []
    for r in range(repeats):
      s = engine.submit(Request(_prompt(tok, n, r), 1, stop_ids=()))
      list(s)
      ttfts.append(s.first_token_time)
    out[f"ttft_{n}_s"] = float(np.median(ttfts))
  # TPOT pools the gaps of `repeats` streams, as the llama.cpp peer pools its rounds: one
  # stream of a 10 ms step lasts ~1 s, short enough for one burst of this shared machine's
  # noise to move its median (run 18: int8_dynamic 14.9 ms in the benchmark, 9.8-11.7 ms
  # in the same variant run again by itself).
  gaps, faults, steps = [], 0, 0
  for r in range(repeats):
    s = engine.submit(Request(_prompt(tok, 128, r), new_tokens, stop_ids=()))
    times = []
    for e in s:
      if not times:  # from the first token on: the prompt's prefill is not a decode step
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      times.append(e.time)
    if times:
      faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
      steps += len(times) - 1
    gaps.extend(np.diff(times))
  # Fresh pages touched per step: ~0 unless a step materialises weights or copies the cache.
  out["page_faults_per_step"] = faults / max(steps, 1)
  out["tpot_median_s"] = float(np.median(gaps))
  out["tpot_p90_s"] = float(np.percentile(gaps, 90))
  return out


def _prefill_slot0(engine, ids):
  """Prefill `ids` (one chunk) into slot 0 with the engine's compiled prefill; first token."""
  from decode import sampling
  ec = engine.engine_config
  chunk = np.zeros((ec.bucket(len(ids)),), np.int32)
  chunk[:len(ids)] = ids
  engine.state, packed = engine._prefill(
      engine.model, engine.params, engine.state, chunk, np.int32(len(ids)), np.int32(0),
      np.int32(0), sampling.make_params(max_bias=ec.max_bias), ec.top_logprobs, last_chunk=True)
  return int(np.asarray(packed)[0])


def stream_vs_fused(engine, tok, new_tokens, rounds=3):
  """Generator tokens/s and fused-scan tokens/s, for the same greedy tokens (batch 1).

  A warm-up round (it also compiles the fused program), then `rounds` rounds of one run
  each way; the ratio is the median of the rounds' ratios, so the machine's drift between
  rounds does not count as streaming overhead.
  """
  import jax
  from decode import steps
  from decode.engine import Request
  ids = _prompt(tok, 128)
  fused = jax.jit(steps.generate_fused, static_argnums=(0, 3, 4), donate_argnums=2)
  rates, fused_rates, same = [], [], True
  for attempt in range(rounds + 1):
    events = list(engine.submit(Request(ids, new_tokens + 1, stop_ids=())))
    rates.append((len(events) - 1) / (events[-1].time - events[0].time))
    first = _prefill_slot0(engine, ids)
    t = time.perf_counter()
    engine.state, outs = fused(engine.model, engine.params, engine.state, new_tokens,
                               engine.engine_config.top_logprobs)
    outs = np.asarray(outs)
    fused_rates.append(new_tokens / (time.perf_counter() - t))
    engine.state = engine._release(engine.state, np.int32(0))
    same &= [e.token_id for e in events] == [first] + outs[:, 0, 0].astype(int).tolist()
  rates, fused_rates = np.array(rates[1:]), np.array(fused_rates[1:])
  return {"stream_tokens_per_s": float(np.median(rates)),
          "fused_tokens_per_s": float(np.median(fused_rates)),
          "stream_over_fused": float(np.median(rates / fused_rates)),
          "stream_equals_fused": bool(same), "greedy_ids": [e.token_id for e in events]}


THROUGHPUT_PROMPT = 64  # tokens in each prompt of the throughput runs


def _throughput_new_tokens(smoke: bool) -> int:
  return 8 if smoke else 64


def throughput(config, model_config, params, tok, slots, new_tokens, sampled=False):
  """Aggregate decode tokens/s with `slots` concurrent requests: greedy, or sampled with
  temperature 0.8 and top-p 0.95 (a typical chat setting; each request its own seed)."""
  from decode import sampling
  from decode.engine import Engine, Request
  engine = Engine(model_config, params, tok, _engine(config, slots))
  engine.warmup(prompt_lengths=[THROUGHPUT_PROMPT])

  def settings(i):
    if not sampled:
      return None
    return sampling.make_params(temperature=0.8, top_p=0.95, seed=i,
                                max_bias=engine.engine_config.max_bias)
  streams = [engine.submit(Request(_prompt(tok, THROUGHPUT_PROMPT, i), new_tokens, settings(i),
                                  stop_ids=()))
             for i in range(slots)]
  # Admit everyone before the clock starts: each step() prefills at most one largest bucket.
  while any(s.num_tokens == 0 for s in streams):
    engine.step()
  t = time.perf_counter()
  engine.run_until_done()
  elapsed = time.perf_counter() - t
  tokens = sum(s.num_tokens - 1 for s in streams)
  return tokens / elapsed


def long_context(config, model_config, params, tok, contexts, max_len, steps_per_ctx, rounds=2):
  """TPOT at each filled context length, same engine (same max_len, same compiled step).

  The contexts take turns for `rounds` rounds and each gets the median of all its steps:
  this machine's speed drifts over tens of seconds, which one pass per context would
  read as a difference between contexts.
  """
  from decode.engine import Engine, Request
  engine = Engine(model_config, params, tok, _engine(config, 1, max_len))
  gaps = {ctx: [] for ctx in contexts}
  for _ in range(rounds):
    for ctx in contexts:
      s = engine.submit(Request(_prompt(tok, ctx), steps_per_ctx + 1, stop_ids=()))
      gaps[ctx].extend(np.diff([e.time for e in s]))
  return {ctx: float(np.median(g)) for ctx, g in gaps.items()}


def variant(config, model_config, params, tok, name, new_tokens, prompt_len, smoke):
  """TTFT, batch-1 TPOT and 16-slot throughput with the weights stored as `name`.

  float32_VD and float32_packed are float32 with the one-slot engine holding the embedding
  [V,D], as stored, or packed for the native head, instead of "auto"'s [D,V]: the same
  run's before/after of those layouts (TTFT and TPOT only). A name ending
  in _xla is that storage with the native CPU kernels off (model/native.py), which "auto"
  turns on for these one-slot engines on CPU: the kernels' before/after in the same run
  (TTFT and TPOT only).
  """
  import jax
  import jax.numpy as jnp
  from decode.engine import Engine
  ec = dataclasses.replace(_engine(config, 1), embedding_layout="auto")
  many_slots = not name.endswith("_xla")  # also 16 slots (the one-slot settings would not apply)
  if name.endswith("_xla"):
    ec, name = dataclasses.replace(ec, native_kernels="off"), name.removesuffix("_xla")
  if name in ("float32", "float32_VD", "float32_packed"):
    vconfig, vparams = model_config, params
    if name != "float32":
      layout = name.removeprefix("float32_")
      ec, many_slots = dataclasses.replace(ec, embedding_layout=layout), False
  elif name == "bfloat16":
    vconfig = model_config.replace(param_dtype="bfloat16")
    vparams = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  else:
    from model.quantize import with_quant
    vconfig, vparams = with_quant(model_config, params, name)
  engine = Engine(vconfig, vparams, tok, ec)
  engine.warmup(prompt_lengths=[prompt_len])
  out = latency(engine, tok, new_tokens, [prompt_len], 1 if smoke else 3)
  out["native_kernels"] = engine.config.native_kernels
  del engine
  out["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(vparams))
  if many_slots:
    out["throughput16_tokens_per_s"] = throughput(config, vconfig, vparams, tok,
                                                  2 if smoke else 16, _throughput_new_tokens(smoke))
  return out


def _common_prefix(a, b) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def peers(result, model_config, params, tok, new_tokens, ours) -> dict:
  """Each installed peer on the same weights, with the ratios of ours to theirs:
  Hugging Face transformers (torch) on our float32 params, llama.cpp on the GGUF file."""
  import importlib.util
  import jax
  out = {}
  if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    from decode import peer_hf
    p = peer_hf.measure(jax.device_get(params), model_config, tok, new_tokens, _prompt(tok, 128))
    p["greedy_matches_ours"] = p.pop("hf_greedy_ids") == ours[:new_tokens]
    p["our_tpot_over_hf"] = result["tpot_median_s"] / p["hf_tpot_batch1_s"]
    if 16 in result["throughput_tokens_per_s"]:
      p["our_16slot_over_hf_batch16"] = (result["throughput_tokens_per_s"][16] /
                                         p["hf_tokens_per_s_batch16"])
    out.update(p)
  else:
    out["hf"] = "not installed (pip install torch==2.13.0 transformers)"
  if importlib.util.find_spec("llama_cpp"):
    from decode import peer_llama_cpp
    from model.gguf_import import default_gguf_path
    try:
      p = peer_llama_cpp.measure_in_subprocess(default_gguf_path(), _prompt(tok, 128),
                                               new_tokens)
    except RuntimeError as e:  # a crash in llama.cpp costs its figures only
      logging.warning("%s", e)
      out["llama_cpp"] = str(e)
    else:
      p["llama_cpp_greedy_prefix_match"] = _common_prefix(p.pop("llama_cpp_greedy_ids"), ours)
      tpot = p["llama_cpp_forward_median_s"]  # the stricter of its two figures
      p["our_tpot_over_llama_cpp"] = result["tpot_median_s"] / tpot
      for name, v in result["variants"].items():
        p[f"{name}_tpot_over_llama_cpp"] = v["tpot_median_s"] / tpot
      out.update(p)
  else:
    out["llama_cpp"] = "not installed (pip install llama-cpp-python)"
  return out


def run(config, smoke: bool, new_tokens: int, slot_counts, peer: bool, variants=()) -> dict:
  import jax
  from decode.compiles import compile_count
  from decode.engine import Engine
  from model.cache import cache_bytes_read, init_cache
  from decode import build
  from model import native

  result = {"config": config.to_dict(), "smoke": smoke, "backend": jax.default_backend(),
            "devices": len(jax.devices())}
  first_rooflines = rooflines(smoke)

  model_config, params, tok = build.load(config, progress=False)
  result["mlp_matmul_GFLOPs_by_rows"] = matmul_flops_by_rows(
      (1, 16, 128), model_config.d_model, model_config.ffn_dim)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  ec = _engine(config, 1)
  cache = jax.eval_shape(lambda: init_cache(model_config, 1, ec.max_len, None, ec.cache_block))
  ctx = 128 + new_tokens // 2  # mean context of the TPOT run
  kv_bytes = cache_bytes_read(cache, ctx)
  step_bytes = weight_bytes + kv_bytes
  result.update(weight_bytes=weight_bytes, step_bytes=step_bytes,
                num_params=model_config.num_params)

  engine = Engine(model_config, params, tok, ec)
  # How "auto" holds the table for this one-slot engine (EngineConfig.embedding_layout).
  result["embedding_layout"] = engine.config.embedding_layout
  result["native_kernels"] = engine.config.native_kernels
  # Which build of the kernels (model/native.py), and on what: figures from different
  # machines and instruction sets are not comparable.
  result["native_isa"] = native.isa() if engine.config.native_kernels else None
  result["cpu_model"] = _cpu_model()
  before = compile_count()
  t = time.perf_counter()
  # Seconds per program. Compile times only when the persistent compilation cache is off
  # (as in `python -m decode.benchmark`; the test suite turns it on).
  compile_times = engine.warmup()
  compile_times["warmup_all_buckets_s"] = time.perf_counter() - t
  result["compiles_in_warmup"] = compile_count() - before

  warm = compile_count()
  prompt_lens = [8, 24] if smoke else [128, 512, 2048]
  # The bandwidth is also read before and after the latency runs (TTFT, then TPOT): a
  # diagnostic, since on this shared machine the best reading moved by 1.5x within a run
  # (runs 21-23: 43-47 GB/s at the start, 69-72 at the end). The target ratio still takes
  # the run's best reading.
  around_tpot = [memory_bandwidth(bandwidth_bytes(smoke))["memory_bandwidth_GBps"]]
  result.update(latency(engine, tok, new_tokens, prompt_lens, 1 if smoke else 3))
  around_tpot.append(memory_bandwidth(bandwidth_bytes(smoke))["memory_bandwidth_GBps"])
  result.update(stream_vs_fused(engine, tok, new_tokens, 1 if smoke else 3))
  # The fused program is a benchmark-only extra; the serving path is prefill + decode.
  compiles_after = compile_count() - warm - 1

  batched_new = _throughput_new_tokens(smoke)
  result["throughput_tokens_per_s"] = {
      n: throughput(config, model_config, params, tok, n, batched_new) for n in slot_counts}
  n16 = 16 if 16 in slot_counts else max(slot_counts)  # the batched ratios' slot count
  result["throughput_sampled_tokens_per_s"] = {
      n16: throughput(config, model_config, params, tok, n16, batched_new, sampled=True)}
  contexts = (16, 64) if smoke else (256, 8192)
  steps_per_ctx = 4 if smoke else 32
  tpots = long_context(config, model_config, params, tok, contexts,
                       max(config.engine.max_len, max(contexts) + 2 * steps_per_ctx), steps_per_ctx)
  result["tpot_by_context_s"] = tpots

  # The rooflines once more, now that the run is done: the higher of the two readings counts
  # (a busy minute at the start would otherwise make every ratio of the run look better).
  readings = [first_rooflines, rooflines(smoke)]
  for key in first_rooflines:
    result[key] = max(r[key] for r in readings)
  for key in ("memory_bandwidth_GBps", "matmul_GFLOPs"):
    result[f"{key}_readings"] = [r[key] for r in readings]
  # Every roofline and ratio takes the best of all four bandwidth readings.
  result["memory_bandwidth_at_tpot_GBps_readings"] = around_tpot
  result["memory_bandwidth_at_tpot_GBps"] = max(around_tpot)
  result["memory_bandwidth_GBps"] = max(result["memory_bandwidth_GBps"], *around_tpot)
  result["roofline_tpot_s"] = step_bytes / (result["memory_bandwidth_GBps"] * 1e9)
  # TTFT floor for 128 tokens: every non-embedding weight multiplies 128 rows (timed on the
  # real weights), then one row reads the whole vocabulary head at memory bandwidth.
  head_bytes = sum(x.nbytes for x in jax.tree.leaves(params["embedder"]))
  result["prefill_128_products_s"] = prefill_products_time(params, 16 if smoke else 128)
  result["floor_ttft_128_s"] = (result["prefill_128_products_s"]
                                + head_bytes / (result["memory_bandwidth_GBps"] * 1e9))
  t16 = result["throughput_tokens_per_s"][n16]
  # The throughput runs' mean context (their prompts, then their new tokens), and the least
  # KV a step can read there: a bound must not count bytes some code could skip.
  kv_least = cache_bytes_read(cache, THROUGHPUT_PROMPT + batched_new // 2, whole_blocks=False)
  bound = batched_rooflines(weight_bytes, kv_least, n16, result["memory_bandwidth_GBps"],
                            result["matmul_GFLOPs"], model_config.num_params)
  compute_tokens_per_s = bound["compute_tokens_per_s"]
  result.update(
      compile_times_s=compile_times,
      compute_roofline_tokens_per_s=compute_tokens_per_s,
      peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      tpot_over_roofline=result["tpot_median_s"] / result["roofline_tpot_s"],
      tpot_over_roofline_at_tpot=(result["tpot_median_s"]
                                  * result["memory_bandwidth_at_tpot_GBps"] * 1e9 / step_bytes),
      throughput16_over_compute_roofline=t16 / compute_tokens_per_s,
      throughput16_slots=n16,
      throughput16_memory_roofline_tokens_per_s=bound["memory_tokens_per_s"],
      throughput16_bound_over_compute_roofline=bound["bound_over_compute"],
      throughput16_over_roofline=t16 / bound["lower_tokens_per_s"],
      tpot_ctx8192_over_ctx256=tpots[max(contexts)] / tpots[min(contexts)],
      compiles_after_warmup=compiles_after)
  ours = result.pop("greedy_ids")
  result["variants"] = {}
  for name in variants:
    v = variant(config, model_config, params, tok, name, new_tokens, prompt_lens[0], smoke)
    v["roofline_tpot_s"] = (v["weight_bytes"] + kv_bytes) / (result["memory_bandwidth_GBps"] * 1e9)
    ttft = f"ttft_{prompt_lens[0]}_s"
    v["tpot_over_float32"] = v["tpot_median_s"] / result["tpot_median_s"]
    v["ttft_over_float32"] = v[ttft] / result[ttft]
    if 16 in result["throughput_tokens_per_s"] and "throughput16_tokens_per_s" in v:
      v["throughput16_over_float32"] = v["throughput16_tokens_per_s"] / t16
    result["variants"][name] = v
  if peer:
    result["peer"] = peers(result, model_config, params, tok, new_tokens, ours)
  return result


_TABLE = [
    ("memory bandwidth, the run's best", "memory_bandwidth_GBps", "{:.1f} GB/s"),
    ("memory bandwidth around the latency runs", "memory_bandwidth_at_tpot_GBps", "{:.1f} GB/s"),
    ("matmul", "matmul_GFLOPs", "{:.0f} GFLOP/s"),
    ("bytes per decode step", "step_bytes", "{:.3e} B"),
    ("embedding layout, one-slot engine", "embedding_layout", "{}"),
    ("CPU", "cpu_model", "{}"),
    ("native CPU kernels", "native_kernels", "{}"),
    ("native kernels' instruction set", "native_isa", "{}"),
    ("roofline TPOT", "roofline_tpot_s", "{:.4f} s"),
    ("TPOT median", "tpot_median_s", "{:.4f} s"),
    ("TPOT p90", "tpot_p90_s", "{:.4f} s"),
    ("stream tokens/s", "stream_tokens_per_s", "{:.1f}"),
    ("fused tokens/s", "fused_tokens_per_s", "{:.1f}"),
    ("compute roofline tokens/s", "compute_roofline_tokens_per_s", "{:.1f}"),
    ("prefill 128: its products alone", "prefill_128_products_s", "{:.4f} s"),
    ("TTFT 128 floor (products + head read)", "floor_ttft_128_s", "{:.4f} s"),
    ("peak RSS", "peak_rss_MiB", "{:.0f} MiB"),
    ("page faults per decode step", "page_faults_per_step", "{:.1f}"),
    ("TPOT / roofline", "tpot_over_roofline", "{:.3f}"),
    ("TPOT / roofline at the bandwidth around it", "tpot_over_roofline_at_tpot", "{:.3f}"),
    ("stream / fused", "stream_over_fused", "{:.3f}"),
    ("16-slot tokens/s / compute roofline", "throughput16_over_compute_roofline", "{:.3f}"),
    ("16-slot memory roofline tokens/s", "throughput16_memory_roofline_tokens_per_s", "{:.1f}"),
    ("  highest 16-slot / compute roofline possible",
     "throughput16_bound_over_compute_roofline", "{:.3f}"),
    ("16-slot tokens/s / the lower roofline", "throughput16_over_roofline", "{:.3f}"),
    ("TPOT ctx 8192 / ctx 256", "tpot_ctx8192_over_ctx256", "{:.3f}"),
    ("compiles after warm-up", "compiles_after_warmup", "{}"),
]


def print_table(result, file=sys.stdout):
  for label, key, fmt in _TABLE:
    print(f"{label:38s} {fmt.format(result[key])}", file=file)
  for k, v in result.items():
    if k.startswith("ttft_"):
      print(f"{'TTFT ' + k[5:-2] + ' tokens':38s} {v:.4f} s", file=file)
  for n, v in result["throughput_tokens_per_s"].items():
    print(f"{f'throughput, {n} slots':38s} {v:.1f} tokens/s", file=file)
  for n, v in result["throughput_sampled_tokens_per_s"].items():
    print(f"{f'throughput, {n} slots, sampled':38s} {v:.1f} tokens/s", file=file)
  for m, v in result["mlp_matmul_GFLOPs_by_rows"].items():
    print(f"{f'MLP-shape matmul, {m} rows':38s} {v:.0f} GFLOP/s", file=file)
  for k, v in result["compile_times_s"].items():
    print(f"{'compile + first run, ' + k:38s} {v:.2f} s", file=file)
  for name, v in result["variants"].items():
    for k, x in v.items():
      print(f"{name + ' ' + k:38s} {x:.4g}", file=file)
  for k, v in result.get("peer", {}).items():
    print(f"{'peer ' + k:38s} {v}", file=file)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  slots = [int(s) for s in _SLOTS.value]
  result = run(_CONFIG.value, _SMOKE.value, 4 if _SMOKE.value else _NEW.value,
               [s for s in slots if s <= 4] if _SMOKE.value else slots, _PEER.value,
               [v for v in _VARIANTS.value if v])
  print_table(result)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
