"""In-process tests of what a live server cannot show on demand: chunked prefill interleaved
with decode, a client that stops reading, a full queue while the engine is busy, NaN logits,
and a dead engine. The app runs in real uvicorn on a thread, on 127.0.0.1."""

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import pytest
import uvicorn

from decode.engine import Engine, EngineConfig, Request
from serving.api import create_app
from serving.config import ServeConfig
from serving.engine_thread import EngineThread
from serving.metrics import Metrics
from tests.serving.client import sse_data
from tests.serving.conftest import wait_for

EC = EngineConfig(num_slots=2, max_len=128, prefill_buckets=(16, 32), cache_block=16)


@pytest.fixture(scope="module")
def engine(tiny_config, tiny_params, tiny_tok):
  eng = Engine(tiny_config, tiny_params, tiny_tok, EC)
  eng.warmup()
  return eng


def _ids(tok, text):
  return tuple(tok.encode(text, add_bos=True))


def _request(ids, n):
  return Request(tuple(ids), n, stop_ids=())  # fixed lengths: ignore EOS


@contextlib.contextmanager
def live_app(engine, max_queue=4, **serve):
  worker = EngineThread(engine, Metrics("tiny"), max_queue=max_queue, warmup=False)
  worker.start()
  app = create_app(worker, ServeConfig(model_name="tiny", max_queue=max_queue, **serve))
  sock = socket.create_server(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  wait_for(lambda: server.started, 30, "uvicorn to start")
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", worker
  finally:
    server.should_exit = True
    thread.join(10)
    worker.stop()


def test_long_prompt_prefill_is_interleaved_with_decode(engine, tiny_tok):
  running = engine.submit(_request(_ids(tiny_tok, "The quick"), 40))
  engine.step()
  engine.step()
  long_ids = list(range(5, 5 + 101))  # 4 chunks of the largest bucket (32)
  arrived = len(running._events)
  late = engine.submit(_request(long_ids, 6))
  steps = 0
  while not late._events:
    engine.step()
    steps += 1
  assert steps == 4  # one 32-token chunk per step
  assert len(running._events) - arrived == 4  # and the running stream got a token each step
  engine.run_until_done()
  alone = engine.submit(_request(long_ids, 6))
  assert [e.token_id for e in alone] == [e.token_id for e in late._events]


def test_short_prompts_are_admitted_together(engine, tiny_tok):
  a = engine.submit(_request(_ids(tiny_tok, "café"), 4))
  b = engine.submit(_request(_ids(tiny_tok, "def stream"), 4))
  engine.step()
  assert len(a._events) == len(b._events) == 1  # both prefills fit one step's budget
  engine.run_until_done()


def test_client_that_stops_reading_is_dropped_others_finish(engine, tiny_tok):
  fast_ids, slow_ids = _ids(tiny_tok, "Pack my box"), _ids(tiny_tok, "The lazy dog")
  solo = [e.token_id for e in engine.submit(_request(fast_ids, 30))]

  async def scenario():
    # The fast reader keeps up within 16 events even when the CI machine is loaded; the slow
    # one never reads, so it passes 16 well before its 60 tokens.
    worker = EngineThread(engine, Metrics("tiny"), max_unread=16, warmup=False)
    worker.start()
    try:
      slow = worker.submit([_request(slow_ids, 60)])
      fast = worker.submit([_request(fast_ids, 30)])
      fast_items = [item async for item in fast]
      deadline = time.monotonic() + 30
      while not slow.dropped and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
      slow_items = [item async for item in slow]  # what was buffered, then the end
      return worker, fast_items, slow, slow_items
    finally:
      worker.stop()

  worker, fast_items, slow, slow_items = asyncio.run(scenario())
  assert [i.event.token_id for i in fast_items] == solo
  assert fast_items[-1].event.finish_reason == "length"
  assert slow.dropped and slow_items[-1].event.finish_reason == "cancelled"
  assert len(slow_items) < 60
  assert worker.metrics.slow_client_drops._value.get() == 1
  assert engine.num_active == 0 and engine.num_waiting == 0


def test_full_queue_is_refused_at_once_while_the_engine_is_busy(engine):
  body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}
  with live_app(engine, max_queue=1) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
    with engine._lock:  # the engine thread blocks at its next engine call: nothing finishes
      # 2 slots + a queue of 1: three accepted requests, each holding one place.
      accepted = [client.send(client.build_request("POST", "/v1/completions",
                                                   json={**body, "stream": True}), stream=True)
                  for _ in range(3)]
      assert [r.status_code for r in accepted] == [200] * 3
      refused = client.post("/v1/completions", json=body)
      assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
      assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    for r in accepted:  # once the engine runs again, all three finish
      events = sse_data(r.iter_lines())
      r.close()
      assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_keepalive_comments_while_a_request_waits(engine):
  body = {"prompt": [5, 6], "max_tokens": 3, "stream": True, "logprobs": 0,  # a chunk per token
          "ignore_eos": True}  # the default temperature samples: EOS could end it early
  with live_app(engine, sse_keepalive=0.05) as (url, _), httpx.Client(timeout=30) as client:
    with engine._lock:  # nothing can be generated: only keep-alives can arrive
      r = client.send(client.build_request("POST", url + "/v1/completions", json=body),
                      stream=True)
      lines = r.iter_lines()
      first = next(lines)
    rest = list(lines)
    r.close()
  assert first.startswith(": ping")
  events = sse_data(rest)
  assert events[-1] == "[DONE]" and len(events) == 5  # 3 tokens, the finish, [DONE]


def test_nan_logits_end_the_stream_with_an_error(tiny_config, tiny_params, tiny_tok):
  nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tiny_params)
  engine = Engine(tiny_config, nan_params, tiny_tok, EC)
  with live_app(engine) as (url, _):
    body = {"prompt": "The quick", "max_tokens": 5}
    for path, extra in (("/v1/completions", {}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
      payload = {**body, **extra}
      if extra:
        del payload["prompt"]
      with httpx.stream("POST", url + path, json={**payload, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = sse_data(r.iter_lines())
      assert events == [{"error": {"message": "the model produced NaN or infinite logits",
                                   "type": "server_error", "param": None, "code": None}}, "[DONE]"]
      r = httpx.post(url + path, json=payload, timeout=30)
      assert r.status_code == 500
      assert r.json()["error"]["message"] == "the model produced NaN or infinite logits"
    assert engine.num_active == 0


def test_dead_engine_fails_streams_and_health_turns_503(tiny_config, tiny_params, tiny_tok):
  engine = Engine(tiny_config, tiny_params, tiny_tok, EC)
  real_step = engine.step

  def failing_step():
    if engine.num_waiting:
      raise RuntimeError("device lost")
    return real_step()

  engine.step = failing_step
  with live_app(engine) as (url, worker):
    assert httpx.get(url + "/health").status_code == 200
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"prompt": "a", "max_tokens": 5, "stream": True}) as r:
      events = sse_data(r.iter_lines())
    message = "the engine failed: RuntimeError: device lost"
    assert events == [{"error": {"message": message, "type": "server_error", "param": None,
                                 "code": None}}, "[DONE]"]
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"] == {"message": f"The engine is not running: {message}",
                                 "type": "server_error", "param": None,
                                 "code": "engine_unavailable"}
    assert not worker.alive
