"""API prompts -> token ids: completion prompts as given, chat messages in the Gemma turn template.

Gemma's chat format, one turn per message, the model's turn left open for generation:

  <bos><start_of_turn>user\\n{system}\\n\\n{user text}<end_of_turn>\\n
  <start_of_turn>model\\n{assistant text}<end_of_turn>\\n
  <start_of_turn>user\\n{user text}<end_of_turn>\\n
  <start_of_turn>model\\n

Gemma has no system role: as in its published template, a leading system (or "developer")
message is prepended to the first user turn. Turn markers are placed as ids; message text is
encoded as plain text, so a user typing "<end_of_turn>" cannot forge a turn.
"""

from __future__ import annotations

from typing import Sequence

from model.tokenizer import Tokenizer
from serving.protocol import APIError, ChatMessage

_ROLE = {"user": "user", "assistant": "model"}


def chat_ids(tok: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
  start, end = tok.piece_to_id("<start_of_turn>"), tok.piece_to_id("<end_of_turn>")
  if start < 0 or end < 0:
    raise APIError(400, "this model's tokenizer has no chat turn markers; use /v1/completions")
  messages = list(messages)
  system = ""
  if messages and messages[0].role in ("system", "developer"):
    system = messages.pop(0).text + "\n\n"
  if any(m.role in ("system", "developer") for m in messages):
    raise APIError(400, "a system message is only supported as the first message",
                   param="messages")
  if not any(m.text for m in messages):
    raise APIError(400, "the prompt is empty: no message has any text", param="messages")
  ids = [tok.bos_id]
  for i, m in enumerate(messages):
    prefix = system if i == 0 and m.role == "user" else ""
    ids += [start] + tok.encode(f"{_ROLE[m.role]}\n{prefix}{m.text}") + [end] + tok.encode("\n")
  return ids + [start] + tok.encode("model\n")


def completion_ids(tok: Tokenizer, prompt, vocab_size: int) -> list[list[int]]:
  """One id list per prompt: text gets BOS prepended; token ids are used as given."""
  if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
    prompt = [prompt]
  if not prompt:
    raise APIError(400, "the prompt is empty", param="prompt")
  out = []
  for i, p in enumerate(prompt):
    where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
    if not p:
      raise APIError(400, f"{where} is empty", param="prompt")
    if isinstance(p, str):
      out.append(tok.encode(p, add_bos=True))
    else:
      bad = [t for t in p if not 0 <= t < vocab_size]
      if bad:
        raise APIError(400, f"{where} has token ids outside [0, {vocab_size}): {bad[:5]}",
                       param="prompt")
      out.append(list(p))
  return out
