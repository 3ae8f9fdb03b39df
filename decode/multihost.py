"""Multi-host generation: every process runs the same engine steps; process 0 streams.

JAX runs one SPMD program on every device of every host, so each process must dispatch the
same programs, with the same shapes, in the same order -- or the collectives inside them
wait forever. The engine's device calls are decided on the host: which prompt bucket to
prefill, which slot to release, whether a decode step runs. They stay in lockstep because
  1. process 0 holds the requests and broadcasts them (`broadcast_requests`) before they
     are admitted, so every engine queues the same prompts in the same order;
  2. every process calls `Engine.step()` until it returns False;
  3. a sharded engine returns the packed token rows replicated (decode/engine.py), so every
     process reads the same token ids and takes the same stop / release decisions.
Only process 0 yields the events; the others step silently. The host-side work of every
step (detokenizing, stop strings) is repeated on each process: it is cheap next to a step.

Not covered: cancelling a stream on process 0 alone (the other processes would keep
stepping it). Consume `generate` to the end; a cancel would have to be broadcast too.

Launch (each host runs the same command with its own process id):
  initialize("10.0.0.1:1234", num_processes=2, process_id=i)   # TPU pods: initialize()
  engine = Engine(config, params, tok, ec, plan=ShardingPlan.create(get_sharding(...)))
  for index, event in generate(engine, requests if jax.process_index() == 0 else None): ...
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from decode.engine import Engine, Event, Request
from decode.sampling import SamplingParams


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_cpu_devices: int | None = None,
               timeout_s: int = 300):
  """Join a multi-process JAX job (before anything touches a device).

  On TPU pods and SLURM clusters the arguments can be left out: JAX detects them. On CPU
  (tests, or CPU-only clusters) `local_cpu_devices` sets the host devices per process, and
  collectives go through gloo: XLA's CPU backend has no cross-process collectives of its own.
  """
  if local_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", local_cpu_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s)


def _encode(requests: Sequence[Request]) -> bytes:
  def sampling(p: SamplingParams | None):
    if p is None:
      return None
    fields = {f.name: np.asarray(getattr(p, f.name)) for f in dataclasses.fields(p)}
    return {k: [v.dtype.name, v.tolist()] for k, v in fields.items()}
  return json.dumps([dict(prompt_ids=list(r.prompt_ids), max_new_tokens=r.max_new_tokens,
                          sampling=sampling(r.sampling), stop=list(r.stop),
                          stop_ids=None if r.stop_ids is None else list(r.stop_ids))
                     for r in requests]).encode()


def _decode(data: bytes) -> list[Request]:
  def sampling(d):
    if d is None:
      return None
    return SamplingParams(**{k: np.asarray(v, dtype) for k, (dtype, v) in d.items()})
  return [Request(tuple(r["prompt_ids"]), r["max_new_tokens"], sampling(r["sampling"]),
                  tuple(r["stop"]), None if r["stop_ids"] is None else tuple(r["stop_ids"]))
          for r in json.loads(data)]


def broadcast_requests(requests: Sequence[Request] | None) -> list[Request]:
  """Process 0's requests on every process (others pass None). JSON over two broadcasts:
  the byte count first, since every process must pass an array of the same shape. JSON
  rather than pickle, so nothing executable travels between processes."""
  leader = jax.process_index() == 0
  data = np.frombuffer(_encode(requests), np.uint8) if leader else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  data = multihost_utils.broadcast_one_to_all(data if leader else np.zeros(n, np.uint8))
  return _decode(np.asarray(data, np.uint8).tobytes())


def generate(engine: Engine, requests: Sequence[Request] | None) -> Iterator[tuple[int, Event]]:
  """Run process 0's requests on every process in lockstep; yield (request index, event)
  on process 0 as soon as each step delivers them (nothing on the others)."""
  requests = broadcast_requests(requests)
  leader = jax.process_index() == 0
  delivered: collections.deque[tuple[int, Event]] = collections.deque()
  for i, request in enumerate(requests):
    engine.submit(request, on_event=(lambda e, i=i: delivered.append((i, e))) if leader else None)
  while engine.step():  # a step that delivers anything returns True: nothing is left after
    while delivered:
      yield delivered.popleft()
