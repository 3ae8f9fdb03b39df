"""WS /v1/stream: a bidirectional stream with interrupt, one generation at a time per socket.

Client -> server (JSON text frames):
  {"type": "generate", "messages": [...] | "prompt": "...", <completion fields: max_tokens,
   temperature, top_p, top_k, min_p, seed, stop, logprobs, ignore_eos, model>}
  {"type": "cancel"}        stop the running generation now and free its slot
Server -> client:
  {"type": "start", "id": ..., "prompt_tokens": n}
  {"type": "token", "index": i, "text": delta, "token_id": t, "logprob": lp}   per token
  {"type": "done", "finish_reason": "stop" | "length" | "cancelled", "usage": {...}}
  {"type": "error", "status": 400, "error": {message, type, param, code}}

Validation is the HTTP API's (same models, same messages). The socket stays open across
generations; closing it cancels the running one. Browsers cannot set headers on a
WebSocket, so with an API key the key may also come as the `api_key` query parameter.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket, WebSocketDisconnect

from serving.openai_format import Format
from serving.plan import Plan
from serving.protocol import APIError, ChatRequest, CompletionRequest, error_body, validate
from serving.service import Service
from serving.engine_thread import Submission


async def serve_websocket(ws: WebSocket, service: Service):
  if not service.authorized(ws.headers, ws.query_params):
    await ws.close(code=1008, reason="invalid API key")  # before accept: HTTP 403
    return
  await ws.accept()
  lock = asyncio.Lock()  # the pump and the reader both send

  async def send(message: dict):
    async with lock:
      await ws.send_text(json.dumps(message, ensure_ascii=False))

  async def send_error(e: APIError):
    await send({"type": "error", "status": e.status, **e.body()})

  running: tuple[Submission, asyncio.Task] | None = None
  try:
    while True:
      raw = await ws.receive_text()
      try:
        message = json.loads(raw)
        kind = message.get("type") if isinstance(message, dict) else None
      except json.JSONDecodeError as e:
        await send_error(APIError(400, f"the message is not valid JSON: {e}"))
        continue
      busy = running is not None and not running[1].done()
      if kind == "cancel":
        if busy:
          running[0].cancel()
      elif kind == "generate":
        if busy:
          await send_error(APIError(409, "a generation is already running; send cancel first"))
          continue
        try:
          sub, fmt, p = _start(service, message)
        except APIError as e:
          await send_error(e)
          continue
        running = (sub, asyncio.create_task(_pump(send, service, sub, fmt, p)))
      else:
        await send_error(APIError(400, f"unknown message type {kind!r}; expected 'generate' "
                                  "or 'cancel'", param="type"))
  except WebSocketDisconnect:
    if running is not None and not running[1].done():
      running[0].cancel()
      running[1].cancel()
      service.metrics.disconnects.inc()


def _start(service: Service, message: dict):
  fields = {k: v for k, v in message.items() if k not in ("type", "stream", "stream_options")}
  body = validate(ChatRequest if "messages" in fields else CompletionRequest, fields)
  if body.n != 1:
    raise APIError(400, f"n={body.n}: /v1/stream generates one choice (n=1)", param="n")
  return service.start(body)


async def _pump(send, service: Service, sub: Submission, fmt: Format, p: Plan):
  finished = False
  try:
    await send({"type": "start", "id": fmt.id, "prompt_tokens": p.prompt_tokens})
    async for item in sub:
      ev = item.event
      if ev.token_id >= 0:
        fmt.add(item)
        await send({"type": "token", "index": ev.index, "text": ev.text,
                    "token_id": ev.token_id, "logprob": ev.logprob})
      if ev.finish_reason == "error" or (ev.finish_reason == "cancelled" and sub.dropped):
        await send({"type": "error", "status": 500,
                    **error_body(service.failure(sub, item), "server_error")})
      elif ev.finish_reason:
        await send({"type": "done", "finish_reason": ev.finish_reason,
                    "usage": fmt.usage(p.prompt_tokens)})
    finished = True
  except (WebSocketDisconnect, RuntimeError, OSError):  # the socket closed under us
    pass
  finally:
    if not finished:
      sub.cancel()
