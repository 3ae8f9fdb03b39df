"""The native CPU kernels (model/native.py): the int8 linear layer gives XLA's floats exactly,
decode attention is XLA's block loop up to float32 rounding, and engines that use them stream
what engines without them stream."""

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import sampling
from decode.engine import Engine, EngineConfig, Request
from model import attention, native
from model.cache import LayerCache
from model.quantize import with_quant
from model.sharding import ShardingPlan, get_sharding
from model.transformer import _matmul, _matmul_int8


@pytest.fixture
def kernels():
  """Skips only where the kernels cannot run (another backend, neither AVX-512 VNNI nor AVX2,
  no compiler);
  on a machine that could run them, kernels that fail to build fail the tests."""
  reason = native.unsupported_here()
  if reason:
    pytest.skip(f"native kernels: {reason}")
  assert native.unavailable_reason() is None


def _int8_linear_xla(x, q, scale):
  return _matmul_int8(x, q, scale, jnp.float32, native_kernel=False)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows,out,inner", [(1, 300, 640), (2, 64, 2048), (3, 37, 70),
                                            (4, 5, 129), (1, 1027, 64), (4, 4096, 1)])
def test_int8_linear_sums_are_the_exact_int32_products(rows, out, inner):
  """Every int8 value, including -128 and 127; widths that leave a partial vector at the end
  (64 bytes with AVX-512, 32 with AVX2) and row counts that leave a partial tile. Integer x
  with a 127 in every row has activation scale 1, so with weight scales 1 the outputs are the
  int32 sums as floats."""
  rng = np.random.default_rng(rows * out + inner)
  x = rng.integers(-127, 128, (rows, inner)).astype(np.float32)
  x[:, 0] = 127
  w = rng.integers(-128, 128, (out, inner), dtype=np.int8)
  (got,) = jax.jit(native.int8_linear)(jnp.asarray(x), [(jnp.asarray(w), jnp.ones((out,)))])
  got = np.asarray(got)
  assert got.dtype == np.float32 and got.shape == (rows, out)
  exact = x.astype(np.int64) @ w.astype(np.int64).T
  np.testing.assert_array_equal(got, exact.astype(np.float32))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("wv", [-128, 127])
def test_int8_linear_at_the_extreme_values(wv):
  """x = 127 against all -128 or all 127 over 2048 inputs (the widest product in Gemma 3
  270M): with AVX-512 the largest biased byte (255) and the bias's correction at their
  largest; with AVX2 the largest byte pairs (2 * 128 * 127, just under int16's limit)."""
  x = jnp.full((1, 2048), 127.0)
  w = jnp.full((8, 2048), wv, jnp.int8)
  (got,) = native.int8_linear(x, [(w, jnp.ones((8,)))])
  np.testing.assert_array_equal(np.asarray(got), np.float32(127 * wv * 2048))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_int8_linear_equals_xlas_int8_dynamic_product(rows):
  """The activations' rounding, the products and the rescale give XLA's floats bit for bit,
  for several weights in one call (q, k, v's shapes and odd ones), with an all-zero row."""
  rng = np.random.default_rng(rows)
  x = (3 * rng.standard_normal((rows, 640))).astype(np.float32)
  x[-1] = 0.0 if rows > 1 else x[-1]
  shapes = [1024, 256, 256, 37, 1]
  weights = [(jnp.asarray(rng.integers(-127, 128, (o, 640), dtype=np.int8)),
              jnp.asarray((rng.random(o) + 0.01).astype(np.float32) / 100)) for o in shapes]
  got = jax.jit(native.int8_linear)(jnp.asarray(x), weights)
  want = [jax.jit(_int8_linear_xla)(x, q, s) for q, s in weights]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.usefixtures("kernels")
def test_int8_linear_turns_a_non_finite_row_into_nan():
  """A row holding NaN or inf gives NaN outputs (the step's finiteness check then ends the
  request); other rows are untouched."""
  x = np.ones((3, 64), np.float32)
  x[0, 5], x[2, 9] = np.nan, np.inf
  (got,) = native.int8_linear(jnp.asarray(x), [(jnp.ones((8, 64), jnp.int8), jnp.ones((8,)))])
  got = np.asarray(got)
  assert np.isnan(got[0]).all() and np.isnan(got[2]).all()
  np.testing.assert_array_equal(got[1], 64.0)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows,cap,window,lengths,kv", [
    (1, 1024, None, [900], 1),        # a global layer, its positions sliced across threads
    (3, 1024, None, [5, 1023, 0], 2),  # a short row, a full one, an empty inactive one
    (2, 512, 512, [1500, 300], 2),    # a ring that has wrapped, and one that has not
    (4, 16, 8, [3, 8, 20, 37], 2),    # a small ring with a window shorter than it
    (1, 2048, 512, [1900], 1),        # sliced, with whole slices outside the window
])
def test_attend_decode_equals_the_block_loop(rows, cap, window, lengths, kv):
  """The kernel against attention.py's block loop, for the same written cache: one new token
  per row at position `length`; the last row of several is inactive (nothing is written, its
  old keys are read: none at all for an empty row, whose output is 0)."""
  rng = np.random.default_rng(cap + rows)
  group, dim = 3, 32
  shape = (rows, cap, kv, dim)
  cache = LayerCache(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                     jnp.asarray(rng.standard_normal(shape), jnp.float32), window, min(64, cap))
  q = jnp.asarray(rng.standard_normal((rows, 1, kv * group, dim)), jnp.float32)
  k_new, v_new = (jnp.asarray(rng.standard_normal((rows, 1, kv, dim)), jnp.float32)
                  for _ in range(2))
  filled = jnp.asarray(lengths, jnp.int32)
  active = [i < rows - 1 or rows == 1 for i in range(rows)]
  outs = []
  for use_kernel in (False, True):
    out, _ = jax.jit(attention.attend_decode, static_argnums=7)(
        q, k_new, v_new, filled[:, None], jnp.asarray(active)[:, None], cache, filled, use_kernel)
    outs.append(np.asarray(out))
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-6, rtol=1e-5)
  assert outs[1].shape == (rows, kv, group, 1, dim)
  empty = [i for i, n in enumerate(lengths) if n == 0 and not active[i]]
  assert empty == ([2] if lengths == [5, 1023, 0] else [])
  assert all(np.all(outs[1][i] == 0) for i in empty)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows,shapes,inner", [(2, [1024, 256, 256], 640), (3, [37, 5], 70),
                                               (5, [2048], 2048), (16, [262, 1], 17),
                                               (16, [64], 640), (7, [9], 1), (4, [3], 0),
                                               (16, [640, 37], 2048), (16, [66], 2051),
                                               (9, [5], 1500)])
def test_f32_linear_equals_the_float64_product(rows, shapes, inner):
  """Several weights in one call; row and output counts that leave partial tiles, widths
  that leave a partial vector at the end (16 floats with AVX-512, 8 with AVX2; and none at
  all), and inputs wide enough to be cut into blocks of columns (2-3 blocks, the last one
  ending in a partial vector)."""
  rng = np.random.default_rng(rows * inner + len(shapes))
  x = rng.standard_normal((rows, inner)).astype(np.float32)
  ws = [rng.standard_normal((o, inner)).astype(np.float32) for o in shapes]
  got = jax.jit(native.f32_linear)(jnp.asarray(x), [jnp.asarray(w) for w in ws])
  for g, w in zip(got, ws):
    g = np.asarray(g)
    assert g.dtype == np.float32 and g.shape == (rows, w.shape[0])
    want = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.sqrt(max(inner, 1)))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows,outs,inner", [(1, 262, 640), (2, 32, 70), (16, 300, 64),
                                             (17, 40, 33), (31, 17, 8), (5, 1, 1), (3, 16, 0),
                                             (40, 48, 640)])
def test_f32_packed_linear_equals_the_float64_product(rows, outs, inner):
  """Row counts that take every pass (16, 8, 4, 2, 1 and their sums), output counts that end
  in a partial block of 16 (its padding must not reach the output), and widths down to none."""
  rng = np.random.default_rng(rows * 1000 + outs + inner)
  x = rng.standard_normal((rows, inner)).astype(np.float32)
  w = rng.standard_normal((outs, inner)).astype(np.float32)
  wp = native.pack_weight(jnp.asarray(w))
  assert wp.shape == (-(-outs // 16), inner, 16)
  got = np.asarray(jax.jit(native.f32_packed_linear, static_argnums=2)(jnp.asarray(x), wp, outs))
  assert got.dtype == np.float32 and got.shape == (rows, outs)
  want = x.astype(np.float64) @ w.astype(np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(max(inner, 1)))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("outputs,x_shape,dtype", [(32, (2, 8), jnp.float32),
                                                   (49, (2, 8), jnp.float32),
                                                   (40, (2, 9), jnp.float32),
                                                   (40, (2, 8), jnp.bfloat16)])
def test_f32_packed_linear_refuses_a_wrong_shape(outputs, x_shape, dtype):
  wp = native.pack_weight(jnp.ones((40, 8), dtype))  # 3 blocks: 33..48 outputs
  with pytest.raises(ValueError, match="f32_packed_linear wants"):
    native.f32_packed_linear(jnp.ones(x_shape), wp, outputs)


def test_packed_rows_are_the_rows_of_the_weight():
  w = jnp.arange(37 * 5, dtype=jnp.float32).reshape(37, 5)
  rows = jnp.array([[0, 15, 16], [36, 17, 1]])
  np.testing.assert_array_equal(native.packed_rows(native.pack_weight(w), rows), w[rows])
  np.testing.assert_array_equal(native.unpack_weight(native.pack_weight(w), 37), w)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_f32_products_of_a_few_rows_use_the_kernel(rows):
  """_matmul sends float32 products of 2..max_f32_rows() rows to the kernel when asked (16
  with AVX-512, none with AVX2; one row stays XLA's matrix-vector product), and gets XLA's
  result up to float32 rounding."""
  uses_kernel = 2 <= rows <= native.max_f32_rows()
  assert native.max_f32_rows() == {"avx512": 16, "avx2": 0}[native.isa()]
  x = jax.random.normal(jax.random.key(0), (rows, 640))
  w = jax.random.normal(jax.random.key(1), (300, 640))
  f = jax.jit(lambda x, w: _matmul(x, w, jnp.float32, native_kernel=True))
  assert (native.F32_TARGET in f.lower(x, w).as_text()) is uses_kernel
  np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(_matmul(x, w, jnp.float32)),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_int8_products_of_a_few_rows_use_the_kernel(rows):
  """_matmul_int8 sends 1..max_int8_rows() rows to the kernel (4 with AVX-512, 1 with AVX2)."""
  assert native.max_int8_rows() == {"avx512": 4, "avx2": 1}[native.isa()]
  x = jax.random.normal(jax.random.key(0), (rows, 64))
  q = jnp.ones((8, 64), jnp.int8)
  f = jax.jit(lambda x, q: _matmul_int8(x, q, jnp.ones((8,)), jnp.float32, native_kernel=True))
  assert (native.INT8_TARGET in f.lower(x, q).as_text()) is (rows <= native.max_int8_rows())


def test_kernels_compile_for_every_instruction_set():
  """The sources compile for the instruction sets this machine does not build for, so a
  change that breaks the other build fails here too (the one in use is built and run by the
  tests above)."""
  if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("the kernels are for x86")
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no C++ compiler")
  # A whole build, not -fsyntax-only: an intrinsic of the wrong set is an error only when
  # it is inlined, at code generation.
  with tempfile.TemporaryDirectory() as tmp:
    for name in [name for name in native._ISAS if name != native.isa()]:
      done = subprocess.run(native.compile_command(name, os.path.join(tmp, f"{name}.so")),
                            capture_output=True, text=True, timeout=300)
      assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"


@pytest.mark.usefixtures("kernels")
def test_a_narrower_instruction_set_gives_the_same_results():
  """On an AVX-512 machine, the AVX2 build runs this file's product and attention tests in a
  child process (FLAXSTREAM_KERNEL_ISA=avx2); on an AVX2 machine they ran above already."""
  if native.isa() == "avx2":
    pytest.skip("the kernels in use are the AVX2 build")
  env = dict(os.environ, FLAXSTREAM_KERNEL_ISA="avx2")
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
       "-k", "int8_linear or f32_linear or f32_packed or attend_decode"],
      capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).parents[2])
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


def test_an_unknown_instruction_set_is_refused(monkeypatch):
  monkeypatch.setenv("FLAXSTREAM_KERNEL_ISA", "sse2")
  native.isa.cache_clear()  # isa() reads the setting once per process
  try:
    with pytest.raises(ValueError, match="FLAXSTREAM_KERNEL_ISA"):
      native.isa()
  finally:
    monkeypatch.undo()
    native.isa.cache_clear()


def _streams(config, params, tok, num_slots, mode):
  ec = EngineConfig(num_slots=num_slots, max_len=64, prefill_buckets=(8, 32), cache_block=8,
                    top_logprobs=2, native_kernels=mode)
  engine = Engine(config, params, tok, ec)
  settings = [dict(), dict(temperature=0.9, seed=1), dict(temperature=1.1, top_k=5, seed=2)]
  prompts = ["The quick brown fox", "Pack my box " * 3, "café naïve"]
  streams = [engine.submit(Request(tuple(tok.encode(p, add_bos=True)), 10,
                                   sampling.make_params(**kw), stop_ids=()))
             for p, kw in zip(prompts, settings)]
  return engine.config.native_kernels, [list(s) for s in streams]


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("quant", ["none", "int8_dynamic"])
@pytest.mark.parametrize("num_slots", [1, 4])
def test_engine_streams_the_same_with_and_without_kernels(tiny_config, tiny_params, tiny_tok,
                                                          num_slots, quant):
  """Greedy and sampled tokens are the same, logprobs and top logprobs agree to float32
  rounding (the attention kernel sums in another order), one slot or several."""
  config, params = ((tiny_config, tiny_params) if quant == "none"
                    else with_quant(tiny_config, tiny_params, quant))
  runs = {mode: _streams(config, params, tiny_tok, num_slots, mode) for mode in ("on", "auto", "off")}
  assert [runs[m][0] for m in ("on", "auto", "off")] == [True, True, False]
  on, off = runs["on"][1], runs["off"][1]
  assert [[e.token_id for e in s] for s in on] == [[e.token_id for e in s] for s in off]
  assert [[e.token_id for e in s] for s in on] == [[e.token_id for e in s] for s in runs["auto"][1]]
  assert all(len(s) == 10 for s in on)
  for a, b in zip(on, off):
    np.testing.assert_allclose([e.logprob for e in a], [e.logprob for e in b], atol=1e-4)
    np.testing.assert_allclose([[v for _, v in e.top_logprobs] for e in a],
                               [[v for _, v in e.top_logprobs] for e in b], atol=1e-4)


def test_native_kernel_settings_are_checked(tiny_config, tiny_params, tiny_tok):
  with pytest.raises(ValueError, match="native_kernels"):
    EngineConfig(native_kernels="yes")
  ec = EngineConfig(num_slots=1, max_len=64, prefill_buckets=(8,), cache_block=8,
                    native_kernels="off")
  assert Engine(tiny_config, tiny_params, tiny_tok, ec).config.native_kernels is False


def test_sharded_engines_keep_xlas_code(tiny_config, tiny_params, tiny_tok):
  """The kernels have no partitioning rule, so "auto" leaves sharded engines on XLA's code
  and "on" refuses them with a clear error."""
  config, params = with_quant(tiny_config, tiny_params, "int8_dynamic")
  plan = ShardingPlan.create(get_sharding("single_device"))
  ec = EngineConfig(num_slots=1, max_len=64, prefill_buckets=(8,), cache_block=8)
  assert Engine(config, params, tiny_tok, ec, plan=plan).config.native_kernels is False
  with pytest.raises(ValueError, match="sharded"):
    Engine(config, params, tiny_tok, dataclasses.replace(ec, native_kernels="on"), plan=plan)


@pytest.mark.usefixtures("kernels")
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8_dynamic"])
def test_gemma_streams_with_the_kernels(quant, gemma_gguf, gemma_tokenizer, reference):
  """Gemma 3 270M, one slot, the short reference prompts. float32 with the kernels streams
  the reference's greedy continuations exactly. int8_dynamic: the first token comes from
  prefill, whose only kernel is the exact int8 product, so it and its logprob equal the run
  without kernels bit for bit, and it is the reference's first token for 6 of the 7 prompts
  (as measured). Later tokens are not compared: attention's float32 rounding moves some
  activation across an int8 rounding step, and from there the runs differ as two int8
  models do (logprobs 0.08 apart within 10 tokens; the teacher-forced quality of
  int8_dynamic is test_quantized's)."""
  config, params, _ = gemma_gguf
  if quant != "none":
    config, params = with_quant(config, params, quant)
  prompts = [p for p in reference["prompts"] if len(p["ids"]) <= 32]
  ec = EngineConfig(num_slots=1, max_len=128, prefill_buckets=(32,), cache_block=64)

  def run(mode):
    engine = Engine(config, params, gemma_tokenizer, dataclasses.replace(ec, native_kernels=mode))
    assert engine.config.native_kernels is (mode == "on")
    return [list(engine.submit(Request(tuple(p["ids"]), len(p["greedy_ids"]), stop_ids=())))
            for p in prompts]

  on = run("on")
  if quant == "none":
    assert [[e.token_id for e in s] for s in on] == [p["greedy_ids"] for p in prompts]
    return
  off = run("off")
  assert [(s[0].token_id, s[0].logprob) for s in on] == [(s[0].token_id, s[0].logprob) for s in off]
  first = [s[0].token_id == p["greedy_ids"][0] for s, p in zip(on, prompts)]
  assert len(first) == 7 and sum(first) >= 6, first
