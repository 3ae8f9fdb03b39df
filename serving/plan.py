"""A validated API request -> the engine Requests of its choices, or a 400 naming the numbers.

Choice order follows OpenAI: prompt p, sample j has index p * n + j. Sample j of a request
with `seed` s is drawn with seed s + j, so n=2 gives two different samples that each
reproduce on their own; without a seed every request draws a fresh random one.
"""

from __future__ import annotations

import dataclasses
import secrets

from decode import sampling
from decode.engine import EngineConfig, Request
from serving.protocol import APIError, ChatRequest, SamplingFields


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server can take; derived from the engine and the serve config."""
  max_len: int  # prompt + generated tokens per slot
  vocab_size: int
  top_logprobs: int  # the engine's static top-n (0: chosen-token logprobs only)
  max_bias: int  # logit_bias entries per request
  max_n: int  # choices per request
  default_max_tokens: int  # chat requests without max_tokens, capped to the context

  @classmethod
  def of(cls, ec: EngineConfig, vocab_size: int, max_n: int, default_max_tokens: int):
    return cls(ec.max_len, vocab_size, ec.top_logprobs, ec.max_bias, max_n, default_max_tokens)


@dataclasses.dataclass(frozen=True)
class Plan:
  requests: tuple[Request, ...]  # one per choice, in choice order
  prompt_tokens: int  # summed over prompts (each counted once, whatever n)
  top_logprobs: int | None  # None: no logprobs in the response


def plan(body: SamplingFields, prompts: list[list[int]], limits: Limits) -> Plan:
  n = body.n
  if n * len(prompts) > limits.max_n:
    raise APIError(400, f"n={n} x {len(prompts)} prompt(s) = {n * len(prompts)} choices exceeds "
                   f"this server's limit of {limits.max_n}", param="n")
  chat = isinstance(body, ChatRequest)
  top = body.top_logprobs_n if chat else body.top_logprobs
  if top and top > limits.top_logprobs:
    name = "top_logprobs" if chat else "logprobs"
    raise APIError(400, f"{name}={top} exceeds this server's limit of {limits.top_logprobs} "
                   "(its engine.top_logprobs)", param=name)
  params = [_sampling_params(body, j, limits) for j in range(n)]
  stop_ids = () if body.ignore_eos else None
  requests = []
  for ids in prompts:
    max_tokens = _max_tokens(body, len(ids), limits, chat)
    requests += [Request(tuple(ids), max_tokens, p, body.stops, stop_ids) for p in params]
  return Plan(tuple(requests), sum(len(ids) for ids in prompts), top)


def _max_tokens(body: SamplingFields, prompt_len: int, limits: Limits, chat: bool) -> int:
  asked = body.max_completion_tokens if chat and body.max_completion_tokens else body.max_tokens
  room = limits.max_len - prompt_len
  if asked is None:  # OpenAI's defaults: 16 for completions; chat runs to the context
    asked = min(limits.default_max_tokens, room) if chat else 16
  if prompt_len + asked > limits.max_len:
    raise APIError(
        400, f"This model's maximum context length is {limits.max_len} tokens. However, you "
        f"requested {prompt_len + asked} tokens ({prompt_len} in the "
        f"{'messages' if chat else 'prompt'}, {asked} for the completion). Please reduce the "
        "length of the prompt or the completion.",
        param="messages" if chat else "prompt", code="context_length_exceeded")
  return asked


def _sampling_params(body: SamplingFields, j: int, limits: Limits) -> sampling.SamplingParams:
  seed = (body.seed if body.seed is not None else secrets.randbits(32)) + j
  bias = {}
  for key, value in (body.logit_bias or {}).items():
    if not key.strip().lstrip("-").isdigit() or not 0 <= int(key) < limits.vocab_size:
      raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {limits.vocab_size})",
                     param="logit_bias")
    if not -100 <= value <= 100:
      raise APIError(400, f"logit_bias value {value} for token {key} is outside [-100, 100]",
                     param="logit_bias")
    # -100 bans the token, as in OpenAI's API; other values add to the logit.
    bias[int(key)] = float("-inf") if value == -100 else value
  try:
    return sampling.make_params(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0, seed=seed, logit_bias=bias, max_bias=limits.max_bias)
  except ValueError as e:
    raise APIError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else None) from None
