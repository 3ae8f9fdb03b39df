"""The native int8 kernel (model/int8_kernel.py): the exact int32 product, and an engine that
uses it streams exactly what XLA's product gives."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import sampling
from decode.engine import Engine, EngineConfig, Request
from model import int8_kernel
from model.config import get_config
from model.quantize import with_quant
from model.sharding import ShardingPlan, get_sharding

needs_kernel = pytest.mark.skipif(not int8_kernel.available(),
                                  reason=f"native int8 kernel: {int8_kernel.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("rows,out,inner", [(1, 300, 640), (2, 64, 2048), (3, 37, 70),
                                            (4, 5, 129), (1, 1027, 64), (4, 4096, 1)])
def test_kernel_equals_the_int32_product(rows, out, inner):
  """Every int8 value, including -128 and 127; widths that leave a partial 64-byte tail and
  row counts that leave a partial tile of four."""
  rng = np.random.default_rng(rows * out + inner)
  x = rng.integers(-128, 128, (rows, inner), dtype=np.int8)
  w = rng.integers(-128, 128, (out, inner), dtype=np.int8)
  got = np.asarray(jax.jit(int8_kernel.matmul)(jnp.asarray(x), jnp.asarray(w)))
  assert got.dtype == np.int32 and got.shape == (rows, out)
  np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64).T)


@needs_kernel
def test_kernel_sums_do_not_overflow_at_the_extremes():
  """All -128 (x) against all 127 (w) over 2048 inputs: the largest product this layout sees."""
  x = jnp.full((1, 2048), -128, jnp.int8)
  w = jnp.full((8, 2048), 127, jnp.int8)
  np.testing.assert_array_equal(np.asarray(int8_kernel.matmul(x, w)), -128 * 127 * 2048)


@needs_kernel
@pytest.mark.parametrize("num_slots", [1, 4])
def test_engine_streams_the_same_tokens_and_logprobs_either_way(tiny_config, tiny_params,
                                                                 tiny_tok, num_slots):
  """The kernel's int32 sums equal XLA's, so everything downstream is identical: greedy and
  sampled tokens, their logprobs and the top logprobs, one slot or several."""
  config, params = with_quant(tiny_config, tiny_params, "int8_dynamic")

  def run(mode):
    ec = EngineConfig(num_slots=num_slots, max_len=64, prefill_buckets=(8, 32), cache_block=8,
                      top_logprobs=2, int8_kernel=mode)
    engine = Engine(config, params, tiny_tok, ec)
    settings = [dict(), dict(temperature=0.9, seed=1), dict(temperature=1.1, top_k=5, seed=2)]
    prompts = ["The quick brown fox", "Pack my box " * 3, "café naïve"]
    streams = [engine.submit(Request(tuple(tiny_tok.encode(p, add_bos=True)), 10,
                                     sampling.make_params(**kw), stop_ids=()))
               for p, kw in zip(prompts, settings)]
    out = [[(e.token_id, e.logprob, e.top_logprobs) for e in s] for s in streams]
    return engine.config.int8_kernel, out

  native, native_events = run("native")
  auto, auto_events = run("auto")
  xla, xla_events = run("xla")
  assert (native, auto, xla) == (True, True, False)
  assert native_events == xla_events == auto_events
  assert all(len(events) == 10 for events in native_events)


def test_int8_kernel_settings_are_checked(tiny_config, tiny_params, tiny_tok):
  with pytest.raises(ValueError, match="int8_kernel"):
    EngineConfig(int8_kernel="yes")
  with pytest.raises(ValueError, match="int8_dynamic"):
    get_config("tiny", int8_kernel=True)  # float weights: no int8 activations to multiply
  # Float and weight-only int8 models never use it, whatever the setting.
  ec = EngineConfig(num_slots=1, max_len=64, prefill_buckets=(8,), cache_block=8,
                    int8_kernel="native")
  assert Engine(tiny_config, tiny_params, tiny_tok, ec).config.int8_kernel is False
  config, params = with_quant(tiny_config, tiny_params, "int8")
  assert Engine(config, params, tiny_tok, ec).config.int8_kernel is False


def test_sharded_engines_keep_xlas_product(tiny_config, tiny_params, tiny_tok):
  """The kernel has no partitioning rule, so "auto" leaves sharded engines on XLA's product
  and "native" refuses them with a clear error."""
  config, params = with_quant(tiny_config, tiny_params, "int8_dynamic")
  plan = ShardingPlan.create(get_sharding("single_device"))
  ec = EngineConfig(num_slots=1, max_len=64, prefill_buckets=(8,), cache_block=8)
  assert Engine(config, params, tiny_tok, ec, plan=plan).config.int8_kernel is False
  with pytest.raises(ValueError, match="sharded"):
    Engine(config, params, tiny_tok, dataclasses.replace(ec, int8_kernel="native"), plan=plan)


@needs_kernel
@pytest.mark.slow
def test_gemma_int8_dynamic_streams_the_same_with_the_kernel(gemma_gguf, gemma_tokenizer,
                                                             reference):
  """Gemma 3 270M, int8_dynamic: an engine with the native kernel streams exactly the tokens
  and logprobs of one with XLA's product for the short reference prompts."""
  config, params, _ = gemma_gguf
  config, params = with_quant(config, params, "int8_dynamic")
  prompts = [p for p in reference["prompts"] if len(p["ids"]) <= 32]
  ec = EngineConfig(num_slots=1, max_len=128, prefill_buckets=(32,), cache_block=64)

  def run(mode):
    engine = Engine(config, params, gemma_tokenizer, dataclasses.replace(ec, int8_kernel=mode))
    streams = [list(engine.submit(Request(tuple(p["ids"]), len(p["greedy_ids"]), stop_ids=())))
               for p in prompts]
    return engine.config.int8_kernel, [[(e.token_id, e.logprob) for e in s] for s in streams]

  native, native_events = run("native")
  xla, xla_events = run("xla")
  assert (native, xla) == (True, False)
  assert native_events == xla_events
  # Free-running greedy text drifts from float32's after the first differing token (the
  # teacher-forced agreement is test_quantized's); the first token, from prefill's one-row
  # head through the kernel, matched the reference for 6 of these 7 prompts when measured.
  first = [events[0][0] == p["greedy_ids"][0] for events, p in zip(native_events, prompts)]
  assert len(first) == 7 and sum(first) >= 6, first
