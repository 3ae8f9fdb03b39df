"""The HTTP API: OpenAI-compatible completions and chat over SSE, models, health, metrics, the page.

Request path: auth (401) -> content type and JSON (400) -> pydantic validation (400) ->
Service.start (404, 400, 429, 503). Every check runs before the response starts, so a bad
request gets its status code and an OpenAI error body; after the 200, a failure is sent in
the stream as `data: {"error": ...}` followed by `data: [DONE]`.

SSE framing, keep-alive comments, send timeouts and disconnect detection are
sse-starlette's; when the client goes away it cancels the generator below, whose `finally`
cancels the request, and the engine frees the slot on its next command drain.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from serving.config import ServeConfig
from serving.engine_thread import EngineThread, Submission
from serving.openai_format import Format
from serving.plan import Plan
from serving.protocol import (APIError, ChatRequest, CompletionRequest, error_body, parse_json,
                              validate)
from serving.service import Service
from serving.websocket import serve_websocket

STATIC = pathlib.Path(__file__).parent / "static"


def create_app(worker: EngineThread, config: ServeConfig) -> FastAPI:
  service = Service(worker, config)
  metrics = service.metrics
  app = FastAPI(title="flaxstream", version="0.1.0", docs_url=None, redoc_url=None)
  app.state.service = service

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), e.status, headers=e.headers)

  @app.exception_handler(HTTPException)
  async def _http_error(request, e: HTTPException):
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(e.detail), kind), e.status_code, headers=e.headers)

  @app.get("/health")
  async def health():
    if worker.alive:
      return {"status": "ok"}
    return JSONResponse({"status": "dead", **error_body(worker.error or "not running",
                                                        "server_error")}, 503)

  @app.get("/metrics")
  async def prometheus():
    data, content_type = metrics.exposition()
    return Response(data, media_type=content_type)

  @app.get("/")
  async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")

  @app.get("/v1/models")
  async def models(request: Request):
    service.check_auth(request)
    return {"object": "list", "data": [{
        "id": config.model_name, "object": "model", "created": 0, "owned_by": "flaxstream",
        "max_model_len": service.limits.max_len}]}

  async def _serve(request: Request, model):
    service.check_auth(request)
    body = validate(model, parse_json(await request.body(), request.headers.get("content-type")))
    sub, fmt, p = service.start(body)
    if body.stream:
      return EventSourceResponse(_sse(sub, fmt, p), ping=config.sse_keepalive, sep="\n",
                                 send_timeout=config.send_timeout)
    return await _collect(request, sub, fmt, p)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await _serve(request, CompletionRequest)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await _serve(request, ChatRequest)

  async def _sse(sub: Submission, fmt: Format, p: Plan):
    outcome = "disconnected"
    try:
      async for item in sub:
        if item.event.finish_reason in ("error", "cancelled"):
          outcome = "failed"
          yield {"data": json.dumps(error_body(service.failure(sub, item), "server_error"))}
          yield {"data": "[DONE]"}
          return
        for chunk in fmt.add(item):
          yield {"data": json.dumps(chunk, ensure_ascii=False)}
      if fmt.include_usage:
        yield {"data": json.dumps(fmt.usage_chunk(p.prompt_tokens))}
      yield {"data": "[DONE]"}
      outcome = "done"
    finally:  # also reached when sse-starlette cancels us because the client left
      if outcome != "done":
        sub.cancel()
      if outcome == "disconnected" and not sub.dropped:
        metrics.disconnects.inc()

  async def _collect(request: Request, sub: Submission, fmt: Format, p: Plan):
    async def consume():
      async for item in sub:
        if item.event.finish_reason in ("error", "cancelled"):
          return item
        fmt.add(item)
      return None

    done = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
      await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
      if not done.done():  # the client left (or the server is stopping)
        done.cancel()
        sub.cancel()
        metrics.disconnects.inc()
    if not done.done():
      return Response(status_code=499)  # nobody is there to read it
    failed = done.result()
    if failed is not None:
      sub.cancel()
      raise APIError(500, service.failure(sub, failed), type="server_error",
                     code="generation_failed")
    return JSONResponse(fmt.response(p.prompt_tokens))

  @app.websocket("/v1/stream")
  async def stream(ws: WebSocket):
    await serve_websocket(ws, service)

  return app


async def _disconnected(request: Request):
  """Returns when the client closes the connection (the body has been read already)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass
