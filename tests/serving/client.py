"""Small HTTP helpers for the serving tests: the raw SSE data payloads of a response."""

from __future__ import annotations

import json

import httpx

TIMEOUT = httpx.Timeout(60.0)


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
  return httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)


def sse_data(lines) -> list:
  """`data:` payloads of an SSE body, JSON-decoded; "[DONE]" stays a string."""
  out = []
  for line in lines:
    if line.startswith("data: "):
      data = line[len("data: "):]
      out.append(data if data == "[DONE]" else json.loads(data))
  return out


def stream(url: str, path: str, body: dict, **kw) -> list:
  """POST with stream=true and return every data payload, checking the SSE content type."""
  with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT,
                    **kw) as r:
    assert r.status_code == 200, r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_data(r.iter_lines())
