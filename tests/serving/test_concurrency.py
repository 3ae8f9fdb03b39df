"""Continuous batching seen from clients: many concurrent streams, cancellation, WebSocket cancel.

The tiny server has 8 slots, so 32 concurrent requests are admitted as others finish, and
prompts longer than its largest prefill bucket (256) are prefilled in chunks between decode
steps while other streams run."""

import asyncio
import json

import httpx
import pytest
from websockets.sync.client import connect

from tests.serving.client import post, sse_data

WORDS = "the quick brown fox jumps over the lazy dog pack my box with five dozen jugs".split()


def _prompt(i: int) -> str:
  # From a few tokens to ~450; every 8th is longer than the largest prefill bucket (256).
  n = 3 + (i * 37) % 60 if i % 8 else 80 + 2 * i
  return f"{i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def _body(i: int) -> dict:
  return {"model": "tiny", "prompt": _prompt(i), "max_tokens": 16, "temperature": 0,
          "ignore_eos": True, "logprobs": 1}


def _tokens(logprobs_list) -> tuple:
  return tuple(t for lp in logprobs_list for t in lp["tokens"])


def _lps(logprobs_list) -> list:
  return [x for lp in logprobs_list for x in lp["token_logprobs"]]


def test_32_concurrent_streams_each_equal_its_solo_output(tiny_server):
  solo = []
  for i in range(32):
    choice = post(tiny_server.url, "/v1/completions", _body(i)).json()["choices"][0]
    solo.append((choice["text"], choice["logprobs"]))
  assert len({text for text, _ in solo}) > 1  # the prompts lead to different outputs

  async def one(client, i):
    async with client.stream("POST", "/v1/completions", json={**_body(i), "stream": True}) as r:
      assert r.status_code == 200
      events = sse_data([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1]]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    return "".join(c["text"] for c in choices), [c["logprobs"] for c in choices if c["logprobs"]]

  async def all_at_once():
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=tiny_server.url, limits=limits, timeout=120) as client:
      return await asyncio.gather(*(one(client, i) for i in range(32)))

  before = tiny_server.metrics()
  together = asyncio.run(all_at_once())
  for i, ((text, lps), (solo_text, solo_lp)) in enumerate(zip(together, solo)):
    assert text == solo_text, i
    assert _tokens(lps) == tuple(solo_lp["tokens"]), i
    assert _lps(lps) == pytest.approx(solo_lp["token_logprobs"], abs=1e-4), i
  after = tiny_server.wait_idle()
  # Each request was admitted into a slot once and generated exactly its tokens.
  queued = after["flaxstream:request_queue_time_seconds_count"] - before[
      "flaxstream:request_queue_time_seconds_count"]
  assert queued == 32
  assert after["flaxstream:generation_tokens_total"] - before["flaxstream:generation_tokens_total"] == 32 * 16


def test_cancel_50_streams_midway_frees_every_slot(tiny_server):
  body = {"model": "tiny", "prompt": "Pack my box", "max_tokens": 400, "temperature": 0.7,
          "ignore_eos": True}
  before = tiny_server.metrics()

  async def disconnect_after_chunks(client, k=3):
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
      n = 0
      async for line in r.aiter_lines():
        n += line.startswith("data: ")
        if n == k:
          return "cut"  # leaving the block closes the connection mid-stream
    return "finished"

  async def stream_with_timeout(client):
    try:
      await asyncio.wait_for(disconnect_after_chunks(client, k=10**6), timeout=0.3)
      return "finished"
    except asyncio.TimeoutError:
      return "timeout"

  async def non_stream_with_timeout(client):
    try:
      await client.post("/v1/completions", json=body, timeout=0.3)
      return "finished"
    except httpx.TimeoutException:
      return "timeout"

  async def run():
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=tiny_server.url, limits=limits, timeout=60) as client:
      jobs = ([disconnect_after_chunks(client) for _ in range(20)]
              + [stream_with_timeout(client) for _ in range(20)]
              + [non_stream_with_timeout(client) for _ in range(10)])
      return await asyncio.gather(*jobs)

  outcomes = asyncio.run(run())
  assert outcomes[:20] == ["cut"] * 20
  after = tiny_server.wait_idle()  # running, waiting and slot usage all back to 0
  gone = after["flaxstream:client_disconnects_total"] - before["flaxstream:client_disconnects_total"]
  assert 20 + outcomes.count("timeout") - 2 <= gone <= 50  # a timeout may race a finish
  # Nothing is stuck: a fresh request gets its full length.
  fresh = post(tiny_server.url, "/v1/completions", {**body, "max_tokens": 5}).json()
  assert fresh["choices"][0]["finish_reason"] == "length"
  assert fresh["usage"]["completion_tokens"] == 5


def test_websocket_cancel_frees_the_slot(tiny_server):
  url = tiny_server.url.replace("http://", "ws://") + "/v1/stream"
  with connect(url, open_timeout=10, close_timeout=5) as ws:
    def recv():
      return json.loads(ws.recv(timeout=30))

    ws.send(json.dumps({"type": "generate", "prompt": "The quick", "max_tokens": 400,
                        "ignore_eos": True, "temperature": 0.7}))
    start = recv()
    assert start["type"] == "start" and start["prompt_tokens"] > 0
    tokens = [recv() for _ in range(3)]
    assert [t["type"] for t in tokens] == ["token"] * 3 and [t["index"] for t in tokens] == [0, 1, 2]
    assert tiny_server.metrics()["flaxstream:num_requests_running"] == 1
    ws.send(json.dumps({"type": "cancel"}))
    while (message := recv())["type"] == "token":
      pass
    assert message["type"] == "done" and message["finish_reason"] == "cancelled"
    assert message["usage"]["completion_tokens"] < 400
    tiny_server.wait_idle()
    # The socket stays usable; a bad message is answered, not fatal.
    ws.send("{not json")
    assert recv()["status"] == 400
    ws.send(json.dumps({"type": "generate", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4, "temperature": 0, "ignore_eos": True}))
    messages = [recv() for _ in range(6)]
    assert [m["type"] for m in messages] == ["start"] + ["token"] * 4 + ["done"]
    assert messages[-1]["finish_reason"] == "length"


def test_websocket_disconnect_frees_the_slot(tiny_server):
  url = tiny_server.url.replace("http://", "ws://") + "/v1/stream"
  before = tiny_server.metrics()["flaxstream:client_disconnects_total"]
  with connect(url, open_timeout=10, close_timeout=5) as ws:
    ws.send(json.dumps({"type": "generate", "prompt": "The quick", "max_tokens": 400,
                        "ignore_eos": True, "temperature": 0.7}))
    assert json.loads(ws.recv(timeout=30))["type"] == "start"
    assert json.loads(ws.recv(timeout=30))["type"] == "token"
  after = tiny_server.wait_idle()
  assert after["flaxstream:client_disconnects_total"] == before + 1
