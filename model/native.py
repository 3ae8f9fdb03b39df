"""Native CPU kernels for the decode step, as XLA custom calls (jax.ffi).

Four pieces of a decode step run far below memory or FMA speed in XLA CPU's own code:
  * int8_linear (kernels/int8_linear.cc): int8_dynamic's linear layers for a few rows: the
    activations' rounding to int8, the int8 x int8 products and the rescale, for every
    weight that multiplies the same input in one call. XLA's path (YNNPACK) reads the
    weights at ~12-20 GB/s and wraps each product in two small single-threaded ops; this
    loop streams them with AVX-512 VNNI or AVX2 (the 262144-row head: 5.8 against 9.1 ms on
    AMD Zen 5, 6.4 against 13.9 on Intel, 16.3 against 30.5 on AMD Zen 1 with AVX2). The
    same floats, bit for bit.
  * f32_linear (kernels/f32_linear.cc): float32 linear layers for 2..16 rows (a decode
    step of several slots, a short prefill chunk), every weight that multiplies the same
    input in one call. XLA's product runs at ~20-100 GFLOP/s there; the kernel keeps a tile
    of weight rows in cache for all the rows and prefetches ahead (the head at 16 rows:
    37-38 against 60-63 ms on Intel). The same sums up to float32 rounding order. Routed
    only with AVX-512: with AVX2 XLA's product is as fast (Isa below).
  * f32_packed_linear (kernels/f32_packed.cc): the vocabulary head held packed, 16 rows side
    by side ([V/16, D, 16], pack_weight), for any number of rows: one FMA per weight vector
    and row and no sums across lanes, so 16 rows keep up with memory (the head at 16 rows:
    16.9-17.9 against 20.9-22.2 ms in f32_linear on AMD Zen 5).
  * attend_decode (kernels/attention_decode.cc): one query per row against a layer's KV
    cache. XLA's block loop copies every cache block it reads and hands two tiny products
    per block to its matmul library (~50 us a call); the kernel reads the filled positions
    once, in place. The same softmax, up to float32 rounding order.

They are compiled from source on first use (g++, a few seconds) into the cache directory
and registered with jax.ffi. Where that cannot happen (another backend, a CPU without
AVX-512 VNNI or AVX2, no compiler), `unavailable_reason()` says why and the model keeps
XLA's code. The library is built for the best of AVX-512 (F, BW, VNNI) and AVX2 with FMA
that the CPU has (kernels/simd.h); isa() says which.
ModelConfig.native_kernels selects them; EngineConfig.native_kernels resolves "auto".
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

INT8_TARGET = "flaxstream_int8_linear"
F32_TARGET = "flaxstream_f32_linear"
PACKED_TARGET = "flaxstream_f32_packed_linear"
ATTENTION_TARGET = "flaxstream_attend_decode"
_KERNELS = Path(__file__).parent / "kernels"
_SOURCES = [_KERNELS / "int8_linear.cc", _KERNELS / "f32_linear.cc",
            _KERNELS / "f32_packed.cc", _KERNELS / "attention_decode.cc"]
_COMPILE = ["-O3", "-std=c++17", "-shared", "-fPIC"]


@dataclasses.dataclass(frozen=True)
class Isa:
  """An instruction set the kernels are built for (kernels/simd.h), and how many rows each
  linear kernel takes there: beyond them XLA's own product is as fast or faster (measured
  with the head and MLP shapes of Gemma 3 270M; docs/performance.md)."""
  cpu_flags: tuple[str, ...]  # as /proc/cpuinfo spells them
  compile_flags: tuple[str, ...]
  int8_rows: int  # int8_linear for 1..int8_rows rows
  f32_rows: int   # f32_linear for 2..f32_rows rows (0: never)


_ISAS = {  # best first
    # Intel and AMD Zen 5: from ~4 rows XLA's int8 product is as fast (16 rows: 2x faster);
    # at 32 rows its float32 product is faster for some shapes.
    "avx512": Isa(("avx512f", "avx512bw", "avx512_vnni"),
                  ("-mavx512f", "-mavx512bw", "-mavx512vnni"), int8_rows=4, f32_rows=16),
    # AMD Zen 1: the int8 head 16.3 against 30.5 ms at one row, no faster at four (no byte
    # dot product instruction: two multiplies per pair of bytes); XLA's float32 product of 4
    # and 16 rows is as fast as the kernel (the head at 16 rows: 102 against 112 ms,
    # FMA-bound).
    "avx2": Isa(("avx2", "fma"), ("-mavx2", "-mfma"), int8_rows=1, f32_rows=0),
}


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
  try:
    return frozenset(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")).split())
  except (OSError, StopIteration):
    return None


def _requested() -> str | None:
  return os.environ.get("FLAXSTREAM_KERNEL_ISA") or None  # empty: not set


@functools.cache
def isa() -> str | None:
  """The instruction set the kernels are built for on this CPU ("avx512", "avx2"), or None.

  FLAXSTREAM_KERNEL_ISA=avx2 picks a narrower one than the CPU's best, so that an AVX-512
  machine can test the AVX2 build too (tests/model/test_native.py); another name is a
  ValueError, not a silent fallback. Read once per process, like the library it selects.
  """
  flags = _cpu_flags() or frozenset()
  wanted = _requested()
  if wanted is not None and wanted not in _ISAS:
    raise ValueError(f"FLAXSTREAM_KERNEL_ISA={wanted!r}: expected one of {sorted(_ISAS)}")
  names = [wanted] if wanted else list(_ISAS)
  return next((name for name in names if set(_ISAS[name].cpu_flags) <= flags), None)


def max_int8_rows() -> int:
  """Products of 1..this many rows go to int8_linear when the kernels are on (0 on a CPU
  without either instruction set)."""
  name = isa()
  return _ISAS[name].int8_rows if name else 0


def max_f32_rows() -> int:
  """Products of 2..this many rows go to f32_linear (0: none)."""
  name = isa()
  return _ISAS[name].f32_rows if name else 0


def compile_command(name: str, output: str) -> list[str]:
  """The compiler's command that builds the kernels for instruction set `name` into output."""
  cxx = os.environ.get("CXX", "g++")
  return [cxx, *_COMPILE, *_ISAS[name].compile_flags, f"-I{jax.ffi.include_dir()}",
          *map(str, _SOURCES), "-o", output]


def unsupported_here() -> str | None:
  """Why this machine cannot run the kernels at all (backend, CPU, compiler), or None.

  Unlike unavailable_reason() it builds nothing: where it is None, a failing build is a bug.
  """
  if jax.default_backend() != "cpu":
    return f"the kernels are for XLA CPU, not {jax.default_backend()}"
  if _cpu_flags() is None:
    return "cannot read the CPU's flags from /proc/cpuinfo (x86 Linux only)"
  if isa() is None:
    wanted = _requested()
    return (f"this CPU lacks {wanted} (FLAXSTREAM_KERNEL_ISA)" if wanted
            else "this CPU has neither AVX-512 (F, BW, VNNI) nor AVX2 with FMA")
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    return f"no C++ compiler ({cxx!r} not on PATH)"
  return None


def _build() -> Path:
  """The compiled library, built once per sources, jaxlib version and compiler command
  (cached on disk)."""
  from model.gguf_import import cache_dir
  name = isa()
  files = sorted(_KERNELS.glob("*.[ch]*"))  # the sources and the headers they share
  key = hashlib.sha256(b"".join(p.read_bytes() for p in files) + jax.lib.__version__.encode()
                       + " ".join([platform.machine()] + compile_command(name, "")).encode()
                       ).hexdigest()[:16]
  out = cache_dir() / "kernels" / f"flaxstream_cpu_{name}-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a
  # half-written library under the final name.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    done = subprocess.run(compile_command(name, tmp), capture_output=True, text=True, timeout=300)
    if done.returncode:
      raise RuntimeError(f"compiling the native kernels failed:\n{done.stderr[-2000:]}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernels once per process; None when they are ready, else the
  reason they are not (also a passing one, such as a compiler killed for memory, until the
  process restarts)."""
  reason = unsupported_here()
  if reason is None:
    try:
      lib = ctypes.cdll.LoadLibrary(str(_build()))
      for target, symbol in ((INT8_TARGET, lib.Int8Linear), (F32_TARGET, lib.F32Linear),
                             (PACKED_TARGET, lib.F32PackedLinear),
                             (ATTENTION_TARGET, lib.AttendDecode)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure means "use XLA's code", with why
      reason = f"{type(e).__name__}: {e}"
  if reason is not None:
    logging.info("native CPU kernels not used: %s", reason)
  return reason


def unavailable_reason() -> str | None:
  """None when the kernels can be used here; otherwise why not."""
  return _load()


def available() -> bool:
  return unavailable_reason() is None


def _ready():
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"the native CPU kernels are not available: {reason}")


def int8_linear(x, weights):
  """x [M, I] times int8 weights, with dynamic int8 activations: [(q [O, I] int8, scale [O]
  float32), ...] -> [y [M, O] float32, ...], the floats of model/transformer.py's
  _matmul_int8 for each weight."""
  _ready()
  outs = [jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32) for q, _ in weights]
  args = [a for q, scale in weights for a in (q, scale.astype(jnp.float32))]
  return jax.ffi.ffi_call(INT8_TARGET, outs)(x.astype(jnp.float32), *args)


def f32_linear(x, weights):
  """x [M, I] float32 times float32 weights [w [O, I], ...] -> [y [M, O], ...]."""
  _ready()
  outs = [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w in weights]
  return jax.ffi.ffi_call(F32_TARGET, outs)(x.astype(jnp.float32), *weights)


PACK = 16  # outputs per block of a packed weight (kernels/f32_packed.cc)


def pack_weight(w):
  """w [O, I] -> [ceil(O / 16), I, 16], the layout f32_packed_linear reads: block b holds
  rows 16 b .. 16 b + 15 side by side (zeros past O)."""
  o, i = w.shape
  blocks = -(-o // PACK)
  w = jnp.pad(w, ((0, blocks * PACK - o), (0, 0)))
  return w.reshape(blocks, PACK, i).transpose(0, 2, 1)


def unpack_weight(wp, rows: int):
  """The [rows, I] weight that wp = pack_weight(w) holds (pack_weight undone)."""
  return wp.transpose(0, 2, 1).reshape(-1, wp.shape[1])[:rows]


def packed_rows(wp, rows):
  """Rows `rows` (any int array) of the [O, I] weight that wp = pack_weight(w) holds:
  [*rows.shape, I]."""
  return wp[rows // PACK, :, rows % PACK]


def f32_packed_linear(x, wp, outputs: int):
  """x [M, I] float32 times a packed float32 weight (pack_weight) -> y [M, outputs]."""
  _ready()
  if (x.ndim != 2 or wp.ndim != 3 or wp.shape[1:] != (x.shape[1], PACK)
      or wp.dtype != jnp.float32 or not (wp.shape[0] - 1) * PACK < outputs <= wp.shape[0] * PACK):
    raise ValueError(f"f32_packed_linear wants x [M, I] and a float32 weight [ceil(outputs / "
                     f"{PACK}), I, {PACK}]; got x {x.shape}, weight {wp.shape} {wp.dtype} and "
                     f"outputs={outputs}")
  out = jax.ShapeDtypeStruct((x.shape[0], outputs), jnp.float32)
  return jax.ffi.ffi_call(PACKED_TARGET, out)(x.astype(jnp.float32), wp)


def attend_decode(q, k, v, last, q_pos, window: int | None):
  """One query per row over a ring-buffer KV cache (see kernels/attention_decode.cc).

  q [B,K,G,H], k/v [B,C,K,H] float32, last/q_pos [B] int32 -> [B,K,G,H] float32.
  """
  _ready()
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(ATTENTION_TARGET, out)(
      q, k, v, last.astype(jnp.int32), q_pos.astype(jnp.int32), window=int(window or 0))
