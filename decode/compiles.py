"""Count XLA compilations, so "no compiles after warm-up" is measured rather than assumed."""

from __future__ import annotations

import contextlib
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(name, *_, **__):
  global _count
  if name == _EVENT:
    with _lock:
      _count += 1


def compile_count() -> int:
  """Backend compilations in this process since the first call to this module."""
  global _installed
  with _lock:
    if not _installed:
      jax.monitoring.register_event_duration_secs_listener(_listener)
      _installed = True
    return _count


@contextlib.contextmanager
def count_compiles():
  """`with count_compiles() as n: ...; n()` gives the compiles inside the block so far."""
  start = compile_count()
  yield lambda: compile_count() - start
