"""Settings of the HTTP server (the engine's own live in EngineConfig)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  model_name: str  # the id clients pass as `model`
  max_queue: int = 64  # accepted requests waiting for a slot; beyond this: 429
  max_unread_events: int = 1024  # a request whose client is further behind is dropped
  send_timeout: float = 30.0  # seconds one write to a client may block before it is dropped
  sse_keepalive: float = 0.0  # seconds between ": ping" SSE comments (0: off)
  max_n: int = 16  # choices per request
  default_max_tokens: int = 256  # chat requests without max_tokens (capped to the context)
  api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 when set
  retry_after: int = 1  # seconds, sent with 429

  def __post_init__(self):
    if self.max_queue < 0 or self.max_unread_events < 1 or self.max_n < 1:
      raise ValueError(f"invalid ServeConfig: {self}")
