"""A native int8 x int8 -> int32 product for a few rows, as an XLA CPU custom call.

quant="int8_dynamic" multiplies int8 activations by int8 weights. For a decode step's one
row (or a few), XLA CPU's own path (YNNPACK) reads the weights at ~12 GB/s; the loop in
kernels/int8_matmul.cc streams them at memory speed with AVX-512 VNNI (the 262144-row head:
6.4 against 13.9 ms). Its result is the same int32 product, bit for bit.

The kernel is compiled from source on first use (g++, a few seconds) into the cache
directory and registered with jax.ffi. Where that cannot happen (no compiler, a CPU without
AVX-512 VNNI, another backend), `available()` says why and the model keeps XLA's product.
ModelConfig.int8_kernel selects it; EngineConfig.int8_kernel resolves "auto".
"""

from __future__ import annotations

import ctypes
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

TARGET = "flaxstream_int8_matmul"
MAX_ROWS = 4  # from ~4 rows up XLA's int8 product is as fast (16 rows: 2x faster)
_SOURCE = Path(__file__).parent / "kernels" / "int8_matmul.cc"
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
_COMPILE = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-mavx512f", "-mavx512bw",
            "-mavx512vnni"]


def _missing_cpu_flags() -> list[str]:
  try:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()
  except (OSError, StopIteration):
    return list(_CPU_FLAGS)
  return [f for f in _CPU_FLAGS if f not in flags]


def _build() -> Path:
  """The compiled library, built once per source, jaxlib and compiler (cached on disk)."""
  from model.gguf_import import cache_dir
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH)")
  key = hashlib.sha256(_SOURCE.read_bytes() + jax.lib.__version__.encode()
                       + " ".join([cxx, platform.machine()] + _COMPILE).encode()).hexdigest()[:16]
  out = cache_dir() / "kernels" / f"int8_matmul-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a
  # half-written library under the final name.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *_COMPILE, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, out)
  return out


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernel; None when it is ready, else the reason it is not."""
  if jax.default_backend() != "cpu":
    return f"the kernel is for XLA CPU, not {jax.default_backend()}"
  missing = _missing_cpu_flags()
  if missing:
    return f"this CPU lacks {', '.join(missing)}"
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError) as e:
    return str(e)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Int8Matmul), platform="cpu")
  return None


def unavailable_reason() -> str | None:
  """None when the kernel can be used here; otherwise why not (logged once)."""
  reason = _load()
  if reason is not None:
    logging.info("native int8 kernel not used: %s", reason)
  return reason


def available() -> bool:
  return unavailable_reason() is None


def matmul(xq, q):
  """xq [M, I] int8 times q [O, I] int8 -> [M, O] int32, the exact product (M <= MAX_ROWS)."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"the native int8 kernel is not available: {reason}")
  out = jax.ShapeDtypeStruct((xq.shape[0], q.shape[0]), jnp.int32)
  return jax.ffi.ffi_call(TARGET, out)(xq, q)
