"""The host generator: pipelined streams over the jitted steps (tiny model, random init)."""

import asyncio

import jax
import numpy as np
import pytest

from decode import sampling, steps
from decode.compiles import count_compiles
from decode.engine import Engine, EngineConfig, Request, fit_prompt
from model import native
from model.cache import init_cache

EC = EngineConfig(num_slots=4, max_len=96, prefill_buckets=(8, 16, 32), cache_block=8,
                  top_logprobs=2)


@pytest.fixture(scope="module")
def engine(tiny_config, tiny_params, tiny_tok):
  eng = Engine(tiny_config, tiny_params, tiny_tok, EC)
  eng.warmup()
  return eng


def _request(tok, text, n=12, stop=(), **kw):
  # stop_ids=(): random weights may sample EOS early; these tests want fixed lengths.
  return Request(tuple(tok.encode(text, add_bos=True)), n, sampling.make_params(**kw),
                 tuple(stop), stop_ids=())


def _tokens(stream):
  return [e.token_id for e in stream]


MIXED = [dict(), dict(temperature=0.9, seed=1), dict(temperature=1.2, top_k=5, seed=2),
         dict(temperature=1.0, top_p=0.8, min_p=0.05, seed=3)]
PROMPTS = ["The quick brown fox", "café naïve", "def stream(tokens):", "Pack my box " * 5]


def test_stream_equals_fused_while_loop(engine, tiny_config, tiny_params, tiny_tok):
  n = 10
  streams = [engine.submit(_request(tiny_tok, p, n, **kw)) for p, kw in zip(PROMPTS, MIXED)]
  engine.run_until_done()
  streamed = {s.slot: [e.token_id for e in s._events] for s in streams}

  # Same prompts prefilled into the same slots, then n-1 steps fused in one lax.scan.
  state = steps.init_state(init_cache(tiny_config, EC.num_slots, EC.max_len, None, EC.cache_block))
  prefill = jax.jit(steps.prefill, static_argnums=(0, 8), static_argnames="last_chunk")
  firsts = {}
  for s in streams:
    ids = np.asarray(s.request.prompt_ids, np.int32)
    chunk = np.zeros(64, np.int32)
    chunk[:len(ids)] = ids
    state, packed = prefill(engine.model, engine.params, state, chunk, len(ids), 0, s.slot,
                            s.request.sampling, 0)
    firsts[s.slot] = int(packed[0])
  fused = jax.jit(steps.generate_fused, static_argnums=(0, 3))
  _, packed = fused(engine.model, engine.params, state, n - 1)
  for slot, toks in streamed.items():
    assert toks == [firsts[slot]] + np.asarray(packed[:, slot, 0]).astype(int).tolist()


def test_no_decode_step_past_max_new_tokens(tiny_config, tiny_params, tiny_tok):
  """A request ending at max_new_tokens gets exactly max_new_tokens - 1 decode steps (the
  first token comes from prefill): a step for a token nobody reads would delay the next
  prompt's prefill by a whole step."""
  ec = EngineConfig(num_slots=2, max_len=64, prefill_buckets=(8, 32), cache_block=8)
  engine = Engine(tiny_config, tiny_params, tiny_tok, ec)
  for n in (1, 2, 5):
    before = engine.steps_run
    assert len(_tokens(engine.submit(_request(tiny_tok, "The quick", n)))) == n
    assert engine.steps_run - before == n - 1
  before = engine.steps_run
  # Short prompts, so both are prefilled in the first step.
  streams = [engine.submit(_request(tiny_tok, p, n)) for p, n in (("The quick", 3), ("a b", 7))]
  engine.run_until_done()
  assert [s.num_tokens for s in streams] == [3, 7]
  assert engine.steps_run - before == 6


def test_embedding_layout_auto_and_explicit(tiny_config, tiny_params, tiny_tok):
  """"auto" holds the embedding [D,V] for one float32 slot on CPU; for several slots packed
  where the native kernels run float32 products of several rows, else [V,D]; an explicit
  layout wins, and the layout never changes the tokens."""
  def run(num_slots, layout, kernels="auto"):
    ec = EngineConfig(num_slots=num_slots, max_len=64, prefill_buckets=(8, 32), cache_block=8,
                      embedding_layout=layout, native_kernels=kernels)
    engine = Engine(tiny_config, tiny_params, tiny_tok, ec)
    streams = [engine.submit(_request(tiny_tok, p, 8, **kw)) for p, kw in zip(PROMPTS, MIXED)]
    engine.run_until_done()
    return engine.config.embedding_layout, [_tokens(s) for s in streams]

  packed = native.available() and native.max_f32_rows() > 0
  layout, auto_one = run(1, "auto")
  assert layout == ("DV" if jax.default_backend() == "cpu" else "VD")
  layout, auto_four = run(4, "auto")
  assert layout == ("packed" if packed else "VD")
  assert run(1, "auto", "off")[0] == ("DV" if jax.default_backend() == "cpu" else "VD")
  assert run(1, "DV") == ("DV", auto_one)
  assert run(1, "VD") == ("VD", auto_one)
  assert run(4, "DV") == ("DV", auto_four)
  assert run(4, "VD") == ("VD", auto_four)
  if native.available():
    assert run(4, "packed", "on") == ("packed", auto_four)
    assert run(1, "packed", "on") == ("packed", auto_one)
  with pytest.raises(ValueError, match="packed"):
    run(1, "packed", "off")
  with pytest.raises(ValueError, match="embedding_layout"):
    EngineConfig(embedding_layout="dv")


@pytest.mark.parametrize("commit_params", [False, True])
def test_no_compiles_after_warmup(tiny_config, tiny_params, tiny_tok, commit_params):
  # A fresh engine with shapes no other test uses: jit caches are per function, so an engine
  # sharing shapes with earlier tests could pass on programs they compiled.
  params = jax.device_put(tiny_params, jax.devices()[0]) if commit_params else tiny_params
  ec = EngineConfig(num_slots=3 + commit_params, max_len=80, prefill_buckets=(8, 16, 32),
                    cache_block=8, top_logprobs=1)
  engine = Engine(tiny_config, params, tiny_tok, ec)
  engine.warmup()
  prompts = ["a", "The quick", "café naïve résumé Ärger über", "def stream(tokens): return",
             "Pack my box with five dozen liquor jugs. " * 3, "emoji 😀 " * 12]
  lengths = {len(tiny_tok.encode(p)) for p in prompts}
  assert len(lengths) >= 5 and max(lengths) > ec.prefill_buckets[-1]  # includes a chunked prompt
  with count_compiles() as compiles:
    streams = [engine.submit(_request(tiny_tok, p, 6, **MIXED[i % 4])) for i, p in enumerate(prompts)]
    engine.run_until_done()
    assert all(s.finish_reason == "length" for s in streams)
    assert compiles() == 0


def test_seeded_request_same_tokens_in_any_slot_and_company(engine, tiny_tok):
  req = _request(tiny_tok, "The quick brown fox", 10, temperature=1.0, seed=7)
  alone = _tokens(engine.submit(req))
  # The same request twice in one batch (so in two different slots) beside other requests.
  a = engine.submit(req)
  others = [engine.submit(_request(tiny_tok, p, 10, **kw)) for p, kw in zip(PROMPTS[1:3], MIXED[1:3])]
  b = engine.submit(req)
  engine.run_until_done()
  assert a.slot != b.slot
  assert [e.token_id for e in a._events] == [e.token_id for e in b._events] == alone
  assert all(o.finish_reason == "length" for o in others)


def test_cancel_frees_slot_and_others_continue(engine, tiny_tok):
  solo = [_tokens(engine.submit(_request(tiny_tok, p, 16, **kw))) for p, kw in zip(PROMPTS, MIXED)]
  streams = [engine.submit(_request(tiny_tok, p, 16, **kw)) for p, kw in zip(PROMPTS, MIXED)]
  iters = [iter(s) for s in streams]
  got = [[next(it).token_id] for it in iters]
  for _ in range(4):
    for g, it in zip(got, iters):
      g.append(next(it).token_id)
  iters[1].close()  # like `break` out of a for loop
  assert streams[1].finish_reason == "cancelled" and engine.num_active == 3
  assert streams[1].slot in engine._free
  for g, it in zip(got, iters):
    if it is not iters[1]:
      g.extend(e.token_id for e in it)
  for i in (0, 2, 3):
    assert got[i] == solo[i]
  assert engine.num_active == 0 and sorted(engine._free) == list(range(EC.num_slots))


def test_stop_string_across_tokens_is_never_emitted(engine, tiny_tok):
  # Seeded sampling: the random tiny model's greedy text can be one repeated (empty) piece,
  # and the same seed replays the same tokens up to the stop.
  seeded = dict(temperature=1.0, seed=11)
  events = list(engine.submit(_request(tiny_tok, "The quick brown fox", 24, **seeded)))
  texts = [e.text for e in events]
  # A stop string made of the end of one token's text and the start of the next.
  i = next(i for i in range(3, len(texts) - 1) if texts[i] and texts[i + 1])
  stop = texts[i][-1] + texts[i + 1][0]
  full = "".join(texts)
  stopped = list(engine.submit(_request(tiny_tok, "The quick brown fox", 24, stop=[stop], **seeded)))
  assert stopped[-1].finish_reason == "stop"
  out = "".join(e.text for e in stopped)
  assert out == full[:full.find(stop)]
  assert stop not in out


def test_streaming_equals_non_streaming_and_callbacks(engine, tiny_tok):
  seen = []
  stream = engine.submit(_request(tiny_tok, "café", 12, temperature=0.8, seed=5), on_event=seen.append)
  streamed = "".join(e.text for e in stream)
  text = engine.submit(_request(tiny_tok, "café", 12, temperature=0.8, seed=5)).text()
  assert streamed == text and "".join(e.text for e in seen) == text
  assert [e.index for e in seen] == list(range(12)) and seen[-1].finish_reason == "length"
  assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in seen)
  assert all(e.top_logprobs[0][1] >= e.logprob for e in seen)


def test_async_iteration(engine, tiny_tok):
  async def collect():
    return [e.token_id async for e in engine.submit(_request(tiny_tok, "def stream", 8))]
  assert asyncio.run(collect()) == _tokens(engine.submit(_request(tiny_tok, "def stream", 8)))


def test_eos_stops_with_stop_reason(engine, tiny_tok):
  first = _tokens(engine.submit(_request(tiny_tok, "The quick", 6)))
  req = Request(tuple(tiny_tok.encode("The quick", add_bos=True)), 6, sampling.make_params(),
                stop_ids=(first[2],))
  events = list(engine.submit(req))
  assert len(events) == first.index(first[2]) + 1 and events[-1].finish_reason == "stop"


def test_context_limit_is_a_clear_error(engine, tiny_tok):
  ids = list(range(5, 90))
  with pytest.raises(ValueError, match=r"85 tokens \+ max_new_tokens=20 exceeds .* max_len=96"):
    engine.submit(Request(tuple(ids), 20))
  kept = fit_prompt(ids, 20, 96, keep_start=4)
  assert len(kept) == 76 and kept[:4] == ids[:4] and kept[-1] == ids[-1]
  with pytest.raises(ValueError, match="empty"):
    engine.submit(Request((), 5))
  truncated = engine.submit(Request(tuple(ids), 20, stop_ids=(), truncate_keep_start=4))
  assert truncated.request.prompt_ids == tuple(kept) and len(list(truncated)) == 20


def test_bucket_choice_does_not_change_tokens(engine, tiny_config, tiny_params, tiny_tok):
  """Same requests through an engine with other buckets (other padding, other chunking)."""
  other = Engine(tiny_config, tiny_params, tiny_tok,
                 EngineConfig(num_slots=2, max_len=96, prefill_buckets=(16,), cache_block=16))
  for p, kw in zip(PROMPTS, MIXED):
    assert _tokens(engine.submit(_request(tiny_tok, p, 8, **kw))) == \
        _tokens(other.submit(_request(tiny_tok, p, 8, **kw)))
