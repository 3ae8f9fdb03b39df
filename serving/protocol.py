"""The OpenAI wire format: request models, their validation, and the error body.

Every rejection is an `APIError`, rendered as OpenAI renders errors,
  {"error": {"message": ..., "type": ..., "param": ..., "code": ...}},
with the HTTP status the OpenAI API uses (400 bad input, 401 auth, 404 unknown model,
429 queue full, 503 engine down). Messages name the offending numbers, e.g.
  "temperature: Input should be less than or equal to 2 (got 2.5)".

Unknown fields are ignored (clients send fields of newer API versions); fields this server
knows but cannot honour (penalties, echo) are rejected rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
  include_usage: bool = False


class SamplingFields(BaseModel):
  """Fields shared by /v1/completions and /v1/chat/completions (None means the default)."""
  model_config = ConfigDict(extra="ignore")

  model: str | None = None
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0.0, le=2.0)
  top_p: float | None = Field(None, gt=0.0, le=1.0)
  top_k: int | None = Field(None, ge=0)  # extension (vLLM, llama.cpp): 0 = off
  min_p: float | None = Field(None, ge=0.0, lt=1.0)  # extension: 0 = off
  n: int = Field(1, ge=1)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  logit_bias: dict[str, float] | None = None
  ignore_eos: bool = False  # extension (vLLM): generate through EOS / end-of-turn
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  user: str | None = None

  @pydantic.field_validator("stop")
  @classmethod
  def _stop_not_empty(cls, v):
    stops = [v] if isinstance(v, str) else (v or [])
    for i, s in enumerate(stops):
      if not s:
        where = "stop" if isinstance(v, str) else f"stop[{i}]"
        raise ValueError(f"{where} is an empty string; stop strings must be non-empty")
    return v

  @pydantic.field_validator("presence_penalty", "frequency_penalty")
  @classmethod
  def _no_penalties(cls, v, info):
    if v:
      raise ValueError(f"{info.field_name}={v} is not supported (only 0)")
    return v

  @property
  def stops(self) -> tuple[str, ...]:
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
  prompt: str | list[str] | list[int] | list[list[int]]
  logprobs: int | None = Field(None, ge=0, le=20)
  echo: bool = False

  @pydantic.field_validator("echo")
  @classmethod
  def _no_echo(cls, v):
    if v:
      raise ValueError("echo=true is not supported")
    return v

  @property
  def top_logprobs(self) -> int | None:
    """None: no logprobs; k: the chosen token's logprob and the top k."""
    return self.logprobs


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart] | None = None

  @property
  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(p.text for p in self.content)
    return self.content or ""


class ChatRequest(SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=20)
  max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

  @pydantic.model_validator(mode="after")
  def _top_needs_logprobs(self):
    if self.top_logprobs and not self.logprobs:
      raise ValueError("top_logprobs requires logprobs=true")
    return self

  @property
  def top_logprobs_n(self) -> int | None:
    return (self.top_logprobs or 0) if self.logprobs else None


def parse_json(raw: bytes, content_type: str | None) -> Any:
  """Body bytes -> JSON value, or a 400 for a wrong content type or malformed JSON."""
  media = (content_type or "").split(";")[0].strip().lower()
  if media != "application/json":
    raise APIError(400, f"Content-Type must be application/json, got {content_type!r}")
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise APIError(400, f"the request body is not valid JSON: {e}") from None


def validate(model: type[BaseModel], data: Any) -> BaseModel:
  """JSON value -> request model, or a 400 naming the first bad field and its value."""
  if not isinstance(data, dict):
    raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors(include_url=False)[0]
    param, union = _param_path(err["loc"])
    got = err.get("input")
    if err["type"] == "value_error":  # our own validators already say what was given
      msg = err["msg"].removeprefix("Value error, ")
    elif union:  # one error per union member: none of them is the useful one
      msg = f"{param}: invalid type or value (got {got!r})"
    else:
      msg = f"{param}: {err['msg']}"
      if err["type"] != "missing":
        msg += f" (got {got!r})"
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    raise APIError(400, msg, param=param, code=code) from None


_UNION_TAGS = ("str", "int", "float", "bool")


def _param_path(loc) -> tuple[str, bool]:
  """("messages", 0, "content", "list[TextPart]", 0, "type") -> "messages[0].content[0].type".

  Pydantic names the member of a union field in the location; those names are dropped.
  """
  path, union = "", False
  for part in loc:
    if isinstance(part, int):
      path += f"[{part}]"
    elif "[" in part or part in _UNION_TAGS:
      union = True
    else:
      path += f".{part}" if path else part
  return path, union
