"""Engine events -> OpenAI response objects, for /v1/completions and /v1/chat/completions.

One `Format` per API request accumulates its choices, so the streamed chunks and the
non-streamed response are built from the same events and cannot disagree:
  stream:     add(item) -> chunks; usage_chunk() at the end if asked
  non-stream: add(item) for every item; response()

A chat stream per choice: a first delta with the role, then content deltas, then one chunk
with an empty delta and the finish_reason. A completion stream: text chunks, then one chunk
with empty text and the finish_reason.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from serving.engine_thread import Item


@dataclasses.dataclass
class Choice:
  text: str = ""
  tokens: list = dataclasses.field(default_factory=list)  # [(id, logprob, top, text_offset)]
  finish_reason: str | None = None
  started: bool = False


class Format:
  prefix = ""
  chunk_object = ""
  object = ""

  def __init__(self, model: str, num_choices: int, top_logprobs: int | None,
               piece_bytes: list[bytes], include_usage: bool = False):
    self.model, self.top_logprobs, self.piece_bytes = model, top_logprobs, piece_bytes
    self.include_usage = include_usage
    self.id = self.prefix + uuid.uuid4().hex
    self.created = int(time.time())
    self.choices = [Choice() for _ in range(num_choices)]

  def _token(self, token_id: int) -> str:
    return self.piece_bytes[token_id].decode("utf-8", errors="replace")

  def add(self, item: Item) -> list[dict]:
    """Record one event (a token and/or a stop or length finish); return its stream chunks."""
    c, ev, chunks = self.choices[item.index], item.event, []
    if not c.started:
      c.started = True
      chunks += self._first(item.index)
    if ev.token_id >= 0:
      top = ev.top_logprobs[:self.top_logprobs or 0]
      c.tokens.append((ev.token_id, ev.logprob, top, len(c.text)))
      c.text += ev.text
      if ev.text or self.top_logprobs is not None:
        logprobs = self._logprobs(c.tokens[-1:]) if self.top_logprobs is not None else None
        chunks.append(self._chunk(item.index, ev.text, logprobs, None))
    if ev.finish_reason in ("stop", "length"):
      c.finish_reason = ev.finish_reason
      chunks.append(self._chunk(item.index, None, None, ev.finish_reason))
    return chunks

  def usage(self, prompt_tokens: int) -> dict:
    completion = sum(len(c.tokens) for c in self.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}

  def usage_chunk(self, prompt_tokens: int) -> dict:
    return {**self._head(self.chunk_object), "choices": [], "usage": self.usage(prompt_tokens)}

  def response(self, prompt_tokens: int) -> dict:
    choices = [self._final(i, c) for i, c in enumerate(self.choices)]
    return {**self._head(self.object), "choices": choices, "usage": self.usage(prompt_tokens)}

  def _head(self, obj: str) -> dict:
    return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

  def _wrap(self, choice: dict) -> dict:
    chunk = {**self._head(self.chunk_object), "choices": [choice]}
    if self.include_usage:  # as OpenAI does: every chunk but the last says usage: null
      chunk["usage"] = None
    return chunk

  def _first(self, index: int) -> list[dict]:
    return []

  def _chunk(self, index, text, logprobs, finish_reason) -> dict:
    raise NotImplementedError

  def _final(self, index: int, c: Choice) -> dict:
    raise NotImplementedError

  def _logprobs(self, tokens) -> dict:
    raise NotImplementedError


class CompletionFormat(Format):
  prefix, chunk_object, object = "cmpl-", "text_completion", "text_completion"

  def _chunk(self, index, text, logprobs, finish_reason):
    return self._wrap({"index": index, "text": text or "", "logprobs": logprobs,
                       "finish_reason": finish_reason})

  def _final(self, index, c):
    logprobs = self._logprobs(c.tokens) if self.top_logprobs is not None else None
    return {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

  def _logprobs(self, tokens):
    """The legacy completions layout: parallel lists, top-k as {token: logprob}."""
    return {
        "tokens": [self._token(t) for t, _, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _, _ in tokens],
        "top_logprobs": [{self._token(i): v for i, v in top} for _, _, top, _ in tokens],
        "text_offset": [off for _, _, _, off in tokens],
    }


class ChatFormat(Format):
  prefix, chunk_object, object = "chatcmpl-", "chat.completion.chunk", "chat.completion"

  def _first(self, index):
    return [self._wrap({"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None})]

  def _chunk(self, index, text, logprobs, finish_reason):
    delta = {} if text is None else {"content": text}
    return self._wrap({"index": index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": finish_reason})

  def _final(self, index, c):
    logprobs = self._logprobs(c.tokens) if self.top_logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs, "finish_reason": c.finish_reason}

  def _entry(self, token_id: int, logprob: float) -> dict:
    return {"token": self._token(token_id), "logprob": logprob,
            "bytes": list(self.piece_bytes[token_id])}

  def _logprobs(self, tokens):
    return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(i, v) for i, v in top]}
                        for t, lp, top, _ in tokens], "refusal": None}
