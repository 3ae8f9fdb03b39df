"""The host side: streams of events over the jitted prefill and decode step.

Data path for one request:
  prompt text --Tokenizer.encode--> ids --bucketed chunks--> prefill (writes the slot's KV
  cache, samples the first token on device) --> decode_step for all slots, one token each
  --one [S, 2+2n] device->host copy--> Stream: IncrementalDetokenizer (whole UTF-8 chars
  only) --> StopMatcher (holds back possible stop-string prefixes) --> Event(text delta).

Pipelining: `Engine.step()` dispatches decode step t+1 *before* it reads step t's output, so
the device computes the next token while Python detokenizes the previous one. Step t+1's
input tokens are step t's output still on device; the host never feeds tokens back.
A slot whose request has just stopped (EOS, stop string) may therefore compute one extra
token; it is discarded, and the slot's next prefill resets it. A request that ends at
max_new_tokens is known to end, and gets no extra step.

Several streams share one engine. Iterating any of them drives `step()`, which advances all
slots, so every stream makes progress. `step()` is guarded by a lock: one thread at a time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from decode import sampling, steps
from decode.detokenize import IncrementalDetokenizer
from decode.stops import StopMatcher
from model import native
from model.cache import init_cache
from model.config import EMBEDDING_LAYOUTS, ModelConfig
from model.sharding import ShardingPlan
from model.tokenizer import Tokenizer
from model.transformer import Transformer, layout_embedding


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static shapes of the engine: each distinct value is one compiled program."""
  num_slots: int = 4
  max_len: int = 2048
  prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
  cache_block: int = 256
  top_logprobs: int = 0  # n of the top-n logprobs every step returns (0: none)
  max_bias: int = 16  # logit_bias entries per request
  # How the tied embedding / head is held (ModelConfig.embedding_layout): "VD" as stored,
  # "DV" transposed, "packed" for the native head, or "auto": DV for a one-slot engine with
  # float32 weights on one CPU device, whose one-row head XLA reads fastest from [D,V]
  # (batch-1 TPOT on Intel 47.0 against 50.0 ms packed, on AMD Zen 5 the same); packed for
  # several slots where the native kernels run float32 products of several rows (AVX-512:
  # from 2 to 32 rows the packed head was the fastest); VD everywhere else
  # (model/transformer.py: layout_embedding).
  embedding_layout: str = "auto"
  # Whether decode attention and few-row products (float32, int8_dynamic) run in the native CPU
  # kernels (model/native.py): "on", "off", or "auto": on for one CPU device where they
  # build, off otherwise.
  native_kernels: str = "auto"

  def __post_init__(self):
    if self.embedding_layout not in ("auto", *EMBEDDING_LAYOUTS):
      raise ValueError(f"embedding_layout={self.embedding_layout!r}; expected auto or one of "
                       f"{EMBEDDING_LAYOUTS}")
    if self.native_kernels not in ("auto", "on", "off"):
      raise ValueError(f"native_kernels={self.native_kernels!r}; expected auto, on or off")

  def resolved_embedding_layout(self, config: ModelConfig, native_kernels: bool,
                                sharded: bool) -> str:
    """How the engine holds the embedding (resolves "auto"); native_kernels: whether the
    engine runs them (use_native_kernels)."""
    if self.embedding_layout == "packed" and not native_kernels:
      raise ValueError("embedding_layout='packed' needs the native CPU kernels, which this "
                       "engine does not run (native_kernels, or a sharded engine)")
    if self.embedding_layout != "auto":
      return self.embedding_layout
    float32 = config.quant == "none" and config.param_dtype == "float32"
    if (float32 and self.num_slots == 1 and not sharded and jax.default_backend() == "cpu"):
      return "DV"
    if float32 and native_kernels and native.max_f32_rows() > 0:
      return "packed"
    return "VD"

  def use_native_kernels(self, sharded: bool) -> bool:
    """Whether the engine runs the native CPU kernels (resolves "auto")."""
    if self.native_kernels == "off":
      return False
    if self.native_kernels == "on":
      reason = "the engine is sharded" if sharded else native.unavailable_reason()
      if reason:
        raise ValueError(f"native_kernels='on' needs one CPU device and kernels that build: "
                         f"{reason}")
      return True
    return not sharded and native.available()

  def bucket(self, n: int) -> int:
    """Smallest bucket holding n tokens (the largest one for longer remainders)."""
    return next((b for b in self.prefill_buckets if b >= n), self.prefill_buckets[-1])


@dataclasses.dataclass(frozen=True)
class Event:
  """One generated token. `text` is the printable delta (may be empty while bytes of a
  character or a possible stop string are held back). The last event of a stream has a
  `finish_reason`: "stop" (EOS or stop string), "length", "cancelled", or "error" (the
  model produced non-finite logits; `Stream.error` says so, and no token is emitted)."""
  token_id: int
  text: str
  logprob: float
  index: int
  time: float  # seconds since the request was submitted
  finish_reason: str | None = None
  top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Request:
  prompt_ids: tuple[int, ...]
  max_new_tokens: int = 64
  sampling: sampling.SamplingParams | None = None
  stop: tuple[str, ...] = ()
  stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS / end-of-turn ids
  # None: a prompt that does not fit is an error. k: keep the first k prompt tokens (BOS,
  # system part) and the latest ones that fit, dropping the middle (see fit_prompt).
  truncate_keep_start: int | None = None


def fit_prompt(ids: Sequence[int], max_new_tokens: int, max_len: int,
               keep_start: int | None = None) -> list[int]:
  """Check that prompt + max_new_tokens fits; optionally truncate the middle of the prompt.

  With keep_start=None a prompt that does not fit is an error naming both numbers. With
  keep_start=k the first k tokens (BOS, system part) are kept along with as many of the
  latest tokens as fit, and the middle is dropped.
  """
  ids = list(ids)
  if not ids:
    raise ValueError("the prompt is empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  room = max_len - max_new_tokens
  if len(ids) <= room:
    return ids
  if keep_start is None or room <= keep_start:
    raise ValueError(
        f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the context "
        f"max_len={max_len} (room for a prompt of at most {max(room, 0)} tokens)")
  return ids[:keep_start] + ids[len(ids) - (room - keep_start):]


class Stream:
  """The events of one request. Iterate it (sync or async); close it to cancel."""

  def __init__(self, engine: "Engine", request: Request, on_event: Callable | None):
    self.engine, self.request, self.on_event = engine, request, on_event
    tok = engine.tokenizer
    self._detok = IncrementalDetokenizer(engine.piece_bytes, tok.strips_leading_space)
    self._stops = StopMatcher(request.stop)
    self._stop_ids = set(tok.stop_ids if request.stop_ids is None else request.stop_ids)
    self._events: collections.deque[Event] = collections.deque()
    self.slot: int | None = None
    self.finish_reason: str | None = None
    self.num_tokens = 0
    self.submitted = time.perf_counter()
    self.first_token_time: float | None = None
    self.error: str | None = None

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def _push(self, event: Event):
    self._events.append(event)
    if self.on_event is not None:
      self.on_event(event)

  def _on_token(self, token: int, logprob: float, top: tuple):
    """Host-side bookkeeping for one sampled token: text delta and stop conditions."""
    now = time.perf_counter() - self.submitted
    if self.first_token_time is None:
      self.first_token_time = now
    self.num_tokens += 1
    finish, text = None, ""
    if token in self._stop_ids:  # EOS-like ids end the stream; their piece is not text
      finish, text = "stop", self._end_of_text()
    else:
      text, stopped = self._stops.feed(self._detok.add(token))
      if stopped:
        finish = "stop"
      elif self.num_tokens >= self.request.max_new_tokens:
        finish, text = "length", text + self._end_of_text()
    self.finish_reason = finish
    self._push(Event(token, text, logprob, self.num_tokens - 1, now, finish, top))

  def _end_of_text(self) -> str:
    """Release buffered bytes and held-back text, still never emitting a stop string."""
    text, stopped = self._stops.feed(self._detok.flush())
    return text if stopped else text + self._stops.flush()

  def _fail(self, message: str):
    """End the stream with finish_reason "error"; nothing of the bad step is emitted."""
    self.finish_reason, self.error = "error", message
    now = time.perf_counter() - self.submitted
    self._push(Event(-1, "", 0.0, self.num_tokens, now, "error"))

  def cancel(self):
    """Stop generating now and free the slot; an iterating consumer sees "cancelled"."""
    if not self.done:
      self.finish_reason = "cancelled"
      self.engine._cancel(self)
      now = time.perf_counter() - self.submitted
      self._push(Event(-1, "", 0.0, self.num_tokens, now, "cancelled"))

  close = cancel

  def __iter__(self) -> Iterator[Event]:
    try:
      while True:
        while not self._events:
          self.engine.step()
        event = self._events.popleft()
        yield event
        if event.finish_reason:
          return
    finally:
      self.cancel()

  async def __aiter__(self):
    try:
      while True:
        while not self._events:
          await asyncio.to_thread(self.engine.step)
        event = self._events.popleft()
        yield event
        if event.finish_reason:
          return
    finally:
      self.cancel()

  def text(self) -> str:
    """Run to completion and return the whole text (the non-streaming API)."""
    return "".join(e.text for e in self)


def _prefill_positional(model, params, state, tokens, n_real, start, slot, request, top_n,
                        last_chunk):
  return steps.prefill(model, params, state, tokens, n_real, start, slot, request, top_n,
                       last_chunk=last_chunk)


def _sharded_steps(plan: ShardingPlan, config: ModelConfig, params, make_state):
  """Params and a fresh state on the plan's mesh, and (prefill, decode, release) jitted with
  explicit in/out shardings.

  Params and state follow the rules (the state is donated and keeps its shardings); the
  prompt chunk, scalars and sampling settings go in replicated and the packed rows come out
  replicated, so every process reads the same tokens and takes the same host decisions
  (decode/multihost.py).
  """
  param_sh = plan.param_shardings(config)
  state_sh = plan.state_shardings(jax.eval_shape(make_state))
  rep = plan.replicated
  state = jax.jit(make_state, out_shardings=state_sh)()  # each device builds only its shard
  # jit refuses keyword arguments once in_shardings is given, so last_chunk goes positionally.
  prefill = jax.jit(_prefill_positional, static_argnums=(0, 8, 9), donate_argnums=(2,),
                    in_shardings=(param_sh, state_sh) + (rep,) * 5, out_shardings=(state_sh, rep))
  decode = jax.jit(steps.decode_step, static_argnums=(0, 3), donate_argnums=(2,),
                   in_shardings=(param_sh, state_sh), out_shardings=(state_sh, rep))
  release = jax.jit(steps.release, donate_argnums=(0,), in_shardings=(state_sh, rep),
                    out_shardings=state_sh)
  return (plan.put(params, param_sh), state,
          (lambda *args, last_chunk=True: prefill(*args, last_chunk), decode, release))


class Engine:
  """Owns params, the decode state on device, the compiled steps and the slots."""

  def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer,
               engine_config: EngineConfig = EngineConfig(), cache_dtype=None,
               plan: ShardingPlan | None = None):
    """plan: None runs on the default device; a ShardingPlan places params and state on
    its mesh by its rules and compiles the steps with those shardings (model/sharding.py)."""
    ec = engine_config
    sharded = plan is not None
    kernels = ec.use_native_kernels(sharded)
    config = config.replace(native_kernels=kernels)
    config, params = layout_embedding(config, params,
                                      ec.resolved_embedding_layout(config, kernels, sharded))
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.engine_config = ec
    if max(ec.prefill_buckets) > ec.max_len:
      raise ValueError(f"largest prefill bucket {max(ec.prefill_buckets)} exceeds max_len {ec.max_len}")
    if tokenizer.vocab_size > config.vocab_size:
      raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only "
                       f"{config.vocab_size} embeddings")
    # A model vocabulary padded past the tokenizer's decodes its extra ids to nothing.
    self.piece_bytes = tokenizer.piece_bytes + [b""] * (config.vocab_size - tokenizer.vocab_size)
    self.model = Transformer(config)
    make_state = lambda: steps.init_state(
        init_cache(config, ec.num_slots, ec.max_len, cache_dtype, ec.cache_block), ec.max_bias)
    self.plan = plan
    if plan is None:
      # Commit params and state to one device up front. jit keys its cache on whether inputs
      # are committed: a fresh uncommitted state in warm-up and a committed one afterwards
      # would compile every program a second time on the first real request.
      device = jax.devices()[0]
      self.params, self.state = jax.device_put((params, make_state()), device)
      self._prefill = jax.jit(steps.prefill, static_argnums=(0, 8), static_argnames=("last_chunk",),
                              donate_argnums=(2,))
      self._decode = jax.jit(steps.decode_step, static_argnums=(0, 3), donate_argnums=(2,))
      self._release = jax.jit(steps.release, donate_argnums=(0,))
    else:
      self.params, self.state, (self._prefill, self._decode, self._release) = _sharded_steps(
          plan, config, params, make_state)
    self._free = list(range(ec.num_slots))
    self._slots: dict[int, Stream] = {}
    self._waiting: collections.deque[Stream] = collections.deque()
    self._inflight = None  # (packed device array, [(slot, stream)]) of the last decode step
    self._lock = threading.RLock()
    # The stream whose prompt is part-way through prefill, and where its next chunk starts.
    self._prefilling: tuple[Stream, int] | None = None
    self.steps_run = 0

  # ---- requests -------------------------------------------------------------------------
  def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Stream:
    ec = self.engine_config
    ids = fit_prompt(request.prompt_ids, request.max_new_tokens, ec.max_len,
                     request.truncate_keep_start)
    request = dataclasses.replace(request, prompt_ids=tuple(ids))
    bad = [i for i in request.prompt_ids if not 0 <= i < self.config.vocab_size]
    if bad:
      raise ValueError(f"prompt ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
    if request.sampling is None:
      request = dataclasses.replace(request, sampling=sampling.make_params(max_bias=ec.max_bias))
    stream = Stream(self, request, on_event)
    with self._lock:
      self._waiting.append(stream)
    return stream

  def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
               stop: Sequence[str] = (), add_bos: bool = True, on_event=None,
               **sampling_kwargs) -> Stream:
    """Stream a completion of `prompt` (text, or ids used as given)."""
    ids = self.tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else prompt
    params = sampling.make_params(max_bias=self.engine_config.max_bias, **sampling_kwargs)
    return self.submit(Request(tuple(ids), max_new_tokens, params, tuple(stop)), on_event)

  @property
  def num_active(self) -> int:
    return len(self._slots)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  def _cancel(self, stream: Stream):
    with self._lock:
      if stream in self._waiting:
        self._waiting.remove(stream)
      if self._prefilling and self._prefilling[0] is stream:
        self._prefilling = None
      if stream.slot is not None and self._slots.get(stream.slot) is stream:
        self._free_slot(stream.slot)

  def _free_slot(self, slot: int):
    del self._slots[slot]
    self._free.append(slot)
    self.state = self._release(self.state, np.int32(slot))

  # ---- the loop -------------------------------------------------------------------------
  def _prefill_chunks(self) -> list:
    """Run prefill chunks worth at most one largest bucket of tokens (at least one chunk).

    Capping prefill per step interleaves it with decode: a 2000-token prompt costs the
    running streams four short pauses of one 512-token chunk each instead of one long one,
    while a burst of short prompts is still admitted several per step. Chunks are never
    split to fit the budget: every chunk before a prompt's last is a full largest bucket,
    so no new program is compiled. Returns [(stream, packed first token on device)] for the
    prompts that finished prefill.
    """
    ec = self.engine_config
    budget, finished = ec.prefill_buckets[-1], []
    while True:
      if self._prefilling is None:
        if not (self._waiting and self._free):
          break
        stream = self._waiting.popleft()
        slot = self._free.pop(0)
        stream.slot, self._slots[slot] = slot, stream
        self._prefilling = (stream, 0)
      stream, start = self._prefilling
      ids = stream.request.prompt_ids
      n = min(len(ids) - start, ec.prefill_buckets[-1])
      if ec.bucket(n) > budget and budget < ec.prefill_buckets[-1]:
        break  # does not fit what is left of this step's budget: first thing next step
      budget -= ec.bucket(n)
      chunk = np.zeros((ec.bucket(n),), np.int32)
      chunk[:n] = ids[start:start + n]
      last = start + n == len(ids)
      self.state, packed = self._prefill(
          self.model, self.params, self.state, chunk, np.int32(n), np.int32(start),
          np.int32(stream.slot), stream.request.sampling, ec.top_logprobs, last_chunk=last)
      self._prefilling = None if last else (stream, start + n)
      if last:
        finished.append((stream, packed))
      if budget <= 0:
        break
    return finished

  def step(self) -> bool:
    """One engine iteration. Returns False when there was nothing to do."""
    with self._lock:
      admitted = self._prefill_chunks()
      previous = self._inflight
      self._inflight = None
      prefilling = self._prefilling and self._prefilling[0]
      # Every other stream has one token in flight. One whose in-flight token is its last
      # (max_new_tokens) needs no further step: dispatching one anyway would make the next
      # prompt's prefill queue behind a step whose token is thrown away.
      decoding = [(slot, s) for slot, s in self._slots.items()
                  if s is not prefilling and s.num_tokens + 1 < s.request.max_new_tokens]
      if decoding:  # dispatch step t+1 before reading step t
        self.state, packed = self._decode(self.model, self.params, self.state,
                                          self.engine_config.top_logprobs)
        self._inflight = (packed, decoding)
        self.steps_run += 1
      if previous is not None:
        rows = np.asarray(previous[0])  # the one device->host copy of this step
        for slot, stream in previous[1]:
          self._deliver(stream, rows[slot])
      for stream, packed in admitted:
        self._deliver(stream, np.asarray(packed))
      return bool(admitted or previous or self._inflight or self._prefilling)

  def _deliver(self, stream: Stream, row: np.ndarray):
    if stream.done:
      return
    if row[2] != 1.0:
      stream._fail("the model produced NaN or infinite logits")
    else:
      n = self.engine_config.top_logprobs
      top = tuple(zip(row[3:3 + n].astype(int).tolist(), row[3 + n:3 + 2 * n].tolist()))
      stream._on_token(int(row[0]), float(row[1]), top)
    if stream.done and self._slots.get(stream.slot) is stream:
      self._free_slot(stream.slot)

  def run_until_done(self):
    """Drive the engine until no request is waiting or running."""
    while self.step():
      pass

  def warmup(self, prompt_lengths: Sequence[int] | None = None) -> dict[str, float]:
    """Compile the decode step and the prefill programs, so no request compiles later.

    By default every bucket; with `prompt_lengths`, only the programs those prompts use.
    Returns the seconds each program's first call took (compile plus one run; a run alone
    when it was already compiled), keyed e.g. prefill_128, prefill_512_chunk, decode_step.
    """
    ec = self.engine_config
    # Chunks before the last are always full largest-bucket chunks: one extra program.
    variants = [(b, True) for b in ec.prefill_buckets] + [(ec.prefill_buckets[-1], False)]
    if prompt_lengths is not None:
      big = ec.prefill_buckets[-1]
      variants = {(ec.bucket(n - big * ((n - 1) // big)), True) for n in prompt_lengths}
      variants |= {(big, False) for n in prompt_lengths if n > big}
    seconds = {}
    for bucket, last in sorted(variants):
      start = time.perf_counter()
      self.state, out = self._prefill(
          self.model, self.params, self.state, np.zeros((bucket,), np.int32), np.int32(1),
          np.int32(0), np.int32(0), sampling.make_params(max_bias=ec.max_bias),
          ec.top_logprobs, last_chunk=last)
      jax.block_until_ready(out)
      seconds[f"prefill_{bucket}" + ("" if last else "_chunk")] = time.perf_counter() - start
    start = time.perf_counter()
    self.state, out = self._decode(self.model, self.params, self.state, ec.top_logprobs)
    jax.block_until_ready(out)
    seconds["decode_step"] = time.perf_counter() - start
    self.state = self._release(self.state, np.int32(0))
    return seconds
