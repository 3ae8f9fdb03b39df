"""What the HTTP and WebSocket front ends share: auth, checks, planning, submission.

Order of checks for a generation request, all before any response starts: model name (404)
-> prompt ids (400: empty, bad ids) -> Plan (400: limits, context) -> EngineThread.submit
(429 when the queue is full, 503 when the engine is dead).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from serving import prompts
from serving.config import ServeConfig
from serving.engine_thread import EngineDead, EngineThread, QueueFull, Submission
from serving.openai_format import ChatFormat, CompletionFormat, Format
from serving.plan import Limits, Plan, plan
from serving.protocol import APIError, ChatRequest, SamplingFields


class Service:
  """What the HTTP and WebSocket front ends share: checks, planning, submission."""

  def __init__(self, worker: EngineThread, config: ServeConfig):
    self.worker, self.config, self.metrics = worker, config, worker.metrics
    engine = worker.engine
    self.tokenizer, self.piece_bytes = engine.tokenizer, engine.piece_bytes
    self.vocab_size = engine.config.vocab_size
    # More choices than the engine can ever hold at once could never be admitted: a 400.
    self.limits = Limits.of(engine.engine_config, self.vocab_size,
                            min(config.max_n, worker.capacity), config.default_max_tokens)

  def authorized(self, headers, query_params=None) -> bool:
    key = self.config.api_key
    if not key:
      return True
    auth = headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else ""
    if not given and query_params is not None:  # browsers cannot set WebSocket headers
      given = query_params.get("api_key", "")
    return hmac.compare_digest(given.encode(), key.encode())

  def check_auth(self, request: Request):
    if not self.authorized(request.headers):
      raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                     code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

  def start(self, body: SamplingFields) -> tuple[Submission, Format, Plan]:
    """Validate the request against the model and limits, then submit it to the engine."""
    if body.model is not None and body.model != self.config.model_name:
      raise APIError(404, f"The model `{body.model}` does not exist. This server serves "
                     f"`{self.config.model_name}`.", param="model", code="model_not_found")
    chat = isinstance(body, ChatRequest)
    if chat:
      ids = [prompts.chat_ids(self.tokenizer, body.messages)]
    else:
      ids = prompts.completion_ids(self.tokenizer, body.prompt, self.vocab_size)
    p = plan(body, ids, self.limits)
    try:
      sub = self.worker.submit(p.requests)
    except QueueFull as e:
      self.metrics.rejected.inc()
      raise APIError(429, f"The server is busy: {e}. Retry later.", type="requests",
                     code="rate_limit_exceeded",
                     headers={"Retry-After": str(self.config.retry_after)}) from None
    except EngineDead as e:
      raise APIError(503, f"The engine is not running: {e}", type="server_error",
                     code="engine_unavailable") from None
    self.metrics.prompt_tokens.inc(p.prompt_tokens)
    cls = ChatFormat if chat else CompletionFormat
    fmt = cls(self.config.model_name, len(p.requests), p.top_logprobs, self.piece_bytes,
              include_usage=body.include_usage)
    return sub, fmt, p

  def failure(self, sub: Submission, item) -> str:
    """The message for a stream that ended in "error" or "cancelled" (ours, not the client's)."""
    if sub.dropped:
      return (f"the client fell more than {self.worker.max_unread} events behind and was "
              "dropped")
    return item.error or f"the request ended early: {item.event.finish_reason}"
