"""One thread owns the engine and every JAX call; the asyncio side talks to it through queues.

  handler --submit()--> command queue --> engine thread: Engine.submit / Stream.cancel, step()
  engine thread: Stream.on_event --> outbox --one call_soon_threadsafe per step--> Submission

A decode step blocks for milliseconds; run on the event loop it would stall every other
connection, and run from several threads it would need the engine's state to be shared. So
one thread calls the engine, and the loop only ever exchanges plain messages with it.

Bounds, so that nothing waits forever and no client can hold the others back:
  * admission: at most num_slots + max_queue streams are accepted at once; beyond that
    `submit` raises QueueFull at once (the API answers 429).
  * per request: events handed to the loop and not yet read are counted; a client that falls
    more than `max_unread` events behind (it stopped reading, so its writes block) has its
    streams cancelled and its slots freed, and the Submission is marked `dropped`.
If the engine raises, the thread records the error, ends every open stream with an "error"
event, and refuses new work (the API's /health turns 503).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Sequence

from decode.engine import Engine, Event, Request, Stream
from serving.metrics import Metrics


class QueueFull(Exception):
  pass


class EngineDead(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Item:
  """One event of choice `index`; `error` is the message of an "error" finish."""
  index: int
  event: Event
  error: str | None = None


class Submission:
  """The streams of one API request (its n choices), as the asyncio side sees them.

  Iterate it (`async for item in submission`) to get the Items of all choices interleaved
  in arrival order, until every choice has finished.
  """

  def __init__(self, worker: "EngineThread", requests: Sequence[Request],
               loop: asyncio.AbstractEventLoop):
    self.requests = tuple(requests)
    self.created = time.perf_counter()
    self.dropped = False  # set by the engine thread: the client fell too far behind
    self._worker, self._loop = worker, loop
    self._queue: asyncio.Queue[Item] = asyncio.Queue()
    self._unread = 0  # the engine thread adds, the loop subtracts
    self._lock = threading.Lock()
    # Engine-thread state.
    self.streams: list[Stream] = []
    self._last_time = [0.0] * len(self.requests)
    self._finished: set[int] = set()  # choices whose final event was sent

  def cancel(self):
    """Cancel every choice (thread-safe; a no-op for finished ones)."""
    self._worker._commands.put(("cancel", self))

  async def __aiter__(self):
    left = len(self.requests)
    while left:
      item = await self._queue.get()
      with self._lock:
        self._unread -= 1
      left -= bool(item.event.finish_reason)
      yield item

  def _add_unread(self) -> int:
    with self._lock:
      self._unread += 1
      return self._unread


class EngineThread:
  def __init__(self, engine: Engine, metrics: Metrics, *, max_queue: int = 64,
               max_unread: int = 1024, warmup: bool = True):
    self.engine, self.metrics = engine, metrics
    self.num_slots = engine.engine_config.num_slots
    self.capacity = self.num_slots + max_queue
    self.max_unread = max_unread
    self.error: str | None = None
    self._warmup = warmup
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()  # guards _load and error against submit()
    self._load = 0  # accepted streams not yet finished
    self._stopping = False
    self._ready = threading.Event()
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    # Engine-thread state.
    self._live: set[Submission] = set()
    self._queued: list[tuple[Submission, Stream]] = []  # waiting for a slot
    self._outbox: list[tuple[Submission, Item]] = []
    self._overflow: set[Submission] = set()

  # ---- the asyncio side -----------------------------------------------------------------
  def start(self):
    """Start the thread and wait for warm-up (compilation) to finish."""
    self._thread.start()
    self._ready.wait()
    if self.error:
      raise RuntimeError(self.error)

  @property
  def alive(self) -> bool:
    return self.error is None and self._thread.is_alive() and self._ready.is_set()

  def submit(self, requests: Sequence[Request]) -> Submission:
    """Accept all choices of a request or none (QueueFull, EngineDead). Call from the loop."""
    sub = Submission(self, requests, asyncio.get_running_loop())
    with self._lock:
      if not self.alive:
        raise EngineDead(self.error or "the engine is not running")
      if self._load + len(requests) > self.capacity:
        raise QueueFull(f"{self._load} of {self.capacity} places ({self.num_slots} slots + a "
                        f"queue of {self.capacity - self.num_slots}) are taken and this request "
                        f"needs {len(requests)}")
      self._load += len(requests)
      self._commands.put(("submit", sub))  # under the lock: a dying engine sees it
    return sub

  def stop(self, timeout: float = 10.0):
    self._stopping = True
    self._commands.put(("wake", None))
    self._thread.join(timeout)

  # ---- the engine thread ----------------------------------------------------------------
  def _run(self):
    try:
      if self._warmup:
        self.engine.warmup()
      self._ready.set()
      busy = False
      while not self._stopping:
        self._drain(block=not busy)
        busy = self.engine.step()
        self._after_step()
      self._die("the server is shutting down")
    except BaseException as e:  # noqa: BLE001 - any failure kills the engine; say why
      self._die(f"the engine failed: {type(e).__name__}: {e}")
    finally:
      self._ready.set()

  def _drain(self, block: bool):
    try:
      # Idle: sleep until a command comes (the timeout only re-checks _stopping).
      cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
    except queue.Empty:
      return
    while True:
      self._handle(*cmd)
      try:
        cmd = self._commands.get_nowait()
      except queue.Empty:
        return

  def _handle(self, kind: str, sub: Submission | None):
    if kind == "submit":
      self._live.add(sub)
      for i, request in enumerate(sub.requests):
        try:
          stream = self.engine.submit(request, on_event=functools.partial(self._on_event, sub, i))
        except ValueError as e:  # the API validates first; this is a last line of defence
          sub.streams.append(None)
          self._end_without_stream(sub, i, str(e))
          continue
        sub.streams.append(stream)
        self._queued.append((sub, stream))
    elif kind == "cancel":
      for stream in sub.streams:
        if stream is not None:
          stream.cancel()  # emits "cancelled" through _on_event unless already finished

  def _on_event(self, sub: Submission, i: int, event: Event):
    """Stream callback, inside Engine.step(): record metrics, queue the event for the loop."""
    stream = sub.streams[i]
    error = stream.error if event.finish_reason == "error" else None
    self._outbox.append((sub, Item(i, event, error)))
    if sub._add_unread() > self.max_unread and not event.finish_reason:
      self._overflow.add(sub)
    m = self.metrics
    t = stream.submitted - sub.created + event.time  # since the API accepted the request
    if event.token_id >= 0:
      m.generation_tokens.inc()
      if event.index == 0:
        m.ttft.observe(t)
      else:
        m.itl.observe(t - sub._last_time[i])
      sub._last_time[i] = t
    if event.finish_reason:
      self._finished(sub, i, event.finish_reason, t)

  def _end_without_stream(self, sub: Submission, i: int, error: str):
    self._outbox.append((sub, Item(i, Event(-1, "", 0.0, 0, 0.0, "error"), error)))
    sub._add_unread()
    self._finished(sub, i, "error", 0.0)

  def _finished(self, sub: Submission, i: int, reason: str, t: float):
    if reason in ("stop", "length"):
      self.metrics.e2e.observe(t)
    self.metrics.finish(reason)
    with self._lock:
      self._load -= 1
    sub._finished.add(i)
    if len(sub._finished) == len(sub.requests):
      self._live.discard(sub)

  def _after_step(self):
    for sub in self._overflow:
      if sub in self._live:
        sub.dropped = True
        self.metrics.slow_client_drops.inc()
        self._handle("cancel", sub)
    self._overflow.clear()
    now, still = time.perf_counter(), []
    for sub, stream in self._queued:
      if stream.slot is not None:
        self.metrics.queue.observe(now - sub.created)
      elif not stream.done:
        still.append((sub, stream))
    self._queued = still
    self._flush()
    running = self.engine.num_active
    with self._lock:
      load = self._load
    self.metrics.running.set(running)
    self.metrics.waiting.set(max(0, load - running))
    self.metrics.kv_usage.set(running / self.num_slots)

  def _flush(self):
    """Hand this step's events to their event loops: one wake-up per loop, not per event."""
    if not self._outbox:
      return
    by_loop = collections.defaultdict(list)
    for sub, item in self._outbox:
      by_loop[sub._loop].append((sub, item))
    self._outbox = []
    for loop, items in by_loop.items():
      try:
        loop.call_soon_threadsafe(_put_all, items)
      except RuntimeError:  # that loop is closed: nobody is listening any more
        pass

  def _die(self, message: str):
    """Refuse new work, then end every open or not-yet-submitted stream with an error."""
    with self._lock:
      self.error = message
    while True:
      try:
        kind, sub = self._commands.get_nowait()
      except queue.Empty:
        break
      if kind == "submit":
        self._live.add(sub)
    for sub in list(self._live):
      for i in range(len(sub.requests)):
        if i not in sub._finished:
          self._end_without_stream(sub, i, message)
    self._flush()
    self.metrics.running.set(0)
    self.metrics.waiting.set(0)
    self.metrics.kv_usage.set(0)


def _put_all(items):
  for sub, item in items:
    sub._queue.put_nowait(item)
