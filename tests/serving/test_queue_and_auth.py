"""A server with one slot, a queue of one, and an API key taken from the environment."""

import asyncio
import json

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.serving.conftest import Server
from tests.serving.client import TIMEOUT, sse_data

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "tiny", "prompt": "The quick", "max_tokens": 500, "temperature": 0.7,
        "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
  # The key by flag (the spelling of the issue and of vLLM); $FLAXSTREAM_API_KEY is the fallback.
  s = Server("--config=configs/serve_tiny.py", "--config.engine.num_slots=1",
             "--max_queue=1", f"--api-key={KEY}", env={"FLAXSTREAM_API_KEY": "not-this-one"})
  yield s
  s.stop()


def test_api_key_is_required_on_v1_only(server):
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    r = httpx.get(server.url + "/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": {
        "message": "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
  assert httpx.get(server.url + "/health").status_code == 200
  assert httpx.get(server.url + "/metrics").status_code == 200
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
  good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
  assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens >= 1


def test_websocket_needs_the_key(server):
  ws_url = server.url.replace("http://", "ws://") + "/v1/stream"
  with pytest.raises(InvalidStatus) as e:
    connect(ws_url, open_timeout=10)
  assert e.value.response.status_code == 403
  with connect(ws_url + f"?api_key={KEY}", open_timeout=10) as ws:
    ws.send(json.dumps({"type": "generate", "prompt": "a", "max_tokens": 2, "ignore_eos": True}))
    kinds = [json.loads(ws.recv(timeout=30))["type"] for _ in range(4)]
    assert kinds == ["start", "token", "token", "done"]


def test_burst_beyond_slots_plus_queue_gets_429_with_retry_after(server):
  """Ten long requests at once: one runs, one waits, the rest are refused at once."""
  before = server.metrics()["flaxstream:requests_rejected_queue_full_total"]
  body = {**LONG, "max_tokens": 500}

  async def one(client):
    async with client.stream("POST", "/v1/completions", json=body) as r:
      if r.status_code != 200:
        return r.status_code, dict(r.headers), json.loads(await r.aread())
      events = sse_data([line async for line in r.aiter_lines()])
      return 200, {}, events

  async def burst():
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=16)) as client:
      return await asyncio.gather(*(one(client) for _ in range(10)))

  results = asyncio.run(burst())
  served = [r for r in results if r[0] == 200]
  refused = [r for r in results if r[0] != 200]
  assert len(served) >= 2 and refused  # the first two always fit; 500 tokens outlast the burst
  for _, events in ((r[0], r[2]) for r in served):
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
  for status, headers, body in refused:
    assert status == 429 and headers["retry-after"] == "1"
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert body["error"]["message"] == ("The server is busy: 2 of 2 places (1 slots + a queue of "
                                        "1) are taken and this request needs 1. Retry later.")
  after = server.wait_idle()
  assert after["flaxstream:requests_rejected_queue_full_total"] - before == len(refused)
  r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=TIMEOUT,
                 json={"prompt": "a", "max_tokens": 3, "ignore_eos": True})
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_n_larger_than_slots_plus_queue_is_a_400(server):
  r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "a", "n": 3})
  assert r.status_code == 400
  assert r.json()["error"]["message"] == "n=3 x 1 prompt(s) = 3 choices exceeds this server's limit of 2"
